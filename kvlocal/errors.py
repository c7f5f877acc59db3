"""kvlocal's error types: every failure kvlocal reports is a KvlocalError."""


class KvlocalError(Exception):
    """Base class of every error kvlocal raises on purpose."""


class NativeLibraryError(KvlocalError):
    """The llama.cpp library is missing, or is not kvlocal's patched build."""


class ModelError(KvlocalError):
    """A model file is missing, unreadable or of an unsupported architecture."""


class EngineError(KvlocalError):
    """llama.cpp refused an operation (decode, state restore, bias update, ...)."""


class ContextFullError(KvlocalError):
    """A conversation or document needs more KV cells than the context holds (or than compacting
    its older part can free)."""
