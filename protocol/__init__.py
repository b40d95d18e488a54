"""What two parties must compute alike: wire format, identity, signatures, sampling,
commitments and the weight codec. Pure Python over numpy, cryptography, zstandard and
protobuf; never imports torch."""
