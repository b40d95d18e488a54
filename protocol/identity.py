"""Ed25519 identities: key files, key ids, signing.

A key id is the libp2p peer id of the key (base58btc of the identity multihash of the
libp2p-protobuf-encoded public key, "12D3KooW..."), so a node id and its peer id on the
peer network name the same key. The trainer's fingerprint is the key id of its key.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

_BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
# libp2p crypto.proto PublicKey{Type=Ed25519(1), Data=<32 bytes>}, wrapped in an
# identity multihash (code 0x00, length 36).
_LIBP2P_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, PUBLIC_KEY_BYTES])
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, len(_LIBP2P_ED25519_PREFIX) + PUBLIC_KEY_BYTES])


class KeyFileError(ValueError):
    """A key file is missing, unreadable, malformed or too widely readable."""


def base58_encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    encoded = ""
    while number:
        number, remainder = divmod(number, 58)
        encoded = _BASE58_ALPHABET[remainder] + encoded
    num_leading_zeros = len(data) - len(data.lstrip(b"\x00"))
    return _BASE58_ALPHABET[0] * num_leading_zeros + encoded


def base58_decode(text: str) -> bytes:
    number = 0
    for char in text:
        index = _BASE58_ALPHABET.find(char)
        if index < 0:
            raise ValueError(f"invalid base58 character {char!r}")
        number = number * 58 + index
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    num_leading_zeros = len(text) - len(text.lstrip(_BASE58_ALPHABET[0]))
    return b"\x00" * num_leading_zeros + body


@functools.lru_cache(maxsize=65536)  # the coordinator names the signer of every request (base58 is ~0.1 ms)
def key_id(public_key: bytes) -> str:
    """The printable id of an Ed25519 public key (equal to its libp2p peer id)."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return base58_encode(_IDENTITY_MULTIHASH_PREFIX + _LIBP2P_ED25519_PREFIX + public_key)


def public_key_from_key_id(identifier: str) -> bytes:
    """Inverse of key_id: the raw public key named by a key id."""
    raw = base58_decode(identifier)
    prefix = _IDENTITY_MULTIHASH_PREFIX + _LIBP2P_ED25519_PREFIX
    if not raw.startswith(prefix) or len(raw) != len(prefix) + PUBLIC_KEY_BYTES:
        raise ValueError(f"{identifier!r} is not the id of an Ed25519 key")
    return raw[len(prefix) :]


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `message` by `public_key`."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An Ed25519 private key with its public key and id."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic key from 32 seed bytes (test vectors, reproducible demos)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write the key as PKCS#8 PEM, readable by the owner only (mode 0600)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        os.chmod(path, 0o600)

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read a key file; refuse one that group or others can read."""
        path = Path(path)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            raise KeyFileError(
                f"key file {path} does not exist; create one with `rollproof keygen --out {path}`"
            ) from None
        if stat.S_ISDIR(path.stat().st_mode):
            raise KeyFileError(f"key file {path} is a directory; name the key file itself (e.g. {path / 'node.key'})")
        if mode & 0o077:
            raise KeyFileError(
                f"key file {path} is accessible by group or others (mode {mode:04o}); run `chmod 600 {path}`"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as error:
            raise KeyFileError(f"key file {path} is not a PEM private key: {error}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        if Path(path).exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity


def load_role_identity(key_file: Path | None, default_path: Path) -> tuple[Identity, bool]:
    """A role's key and whether it was just created. A key file the user named must exist: a
    mistyped path must not become a new identity (a node's credit would split across two ids).
    Without one, the key at `default_path` is used, created there on first start."""
    if key_file is not None:
        return Identity.load(Path(key_file).expanduser()), False
    path = Path(default_path).expanduser()
    created = not path.exists()
    return Identity.load_or_create(path), created
