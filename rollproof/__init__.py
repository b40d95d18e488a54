"""The `rollproof` command and the one-machine launcher."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rollproof")
except PackageNotFoundError:
    __version__ = "0+unknown"
