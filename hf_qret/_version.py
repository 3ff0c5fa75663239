"""The package version (one place: the package root, the artifact manifest and the Hub client read it)."""

__version__ = "0.1.0"
