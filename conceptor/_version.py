"""The version, in a module that imports nothing (the api and the package both read it)."""
__version__ = "0.1.0"
