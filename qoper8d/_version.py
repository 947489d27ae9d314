"""The package's version, in a module of its own so that any module may name it without
importing the package face (and, lazily, everything behind it)."""

__version__ = "0.1.0"
