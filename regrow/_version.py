"""The package version, in a module of its own so that submodules can read it without importing ``regrow``."""

__version__ = "0.1.0"
