"""The untrusted worker daemon."""
