"""The version, in one place: pyproject.toml reads it, ``introspect.__version__`` and ``introspect --version`` show it."""

__version__ = "0.1.0"
