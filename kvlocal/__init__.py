"""kvlocal: compact the KV cache of a local GGUF model with Attention Matching.

    kv = kvlocal.open("model.gguf"); kv.ingest(text); kv.compact(ratio=20); kv.save("doc.kvs")
    session = kvlocal.load("doc.kvs", "model.gguf"); session.ask("...")
    kvlocal.info("doc.kvs")

``import kvlocal`` loads nothing native: llama.cpp is loaded by ``open`` and ``load``.
"""

__version__ = "0.1.0"


def open(model_path: str, **kwargs):  # noqa: A001 - kvlocal.open, like a file
    """A model ready to ingest and compact a document (``kvlocal.api.Compaction``)."""
    from .api import Compaction

    return Compaction(model_path, **kwargs)


def load(path: str, model_path: str, **kwargs):
    """A compacted session reloaded from ``path`` for ask()/chat() (``kvlocal.api.CompactedSession``)."""
    from .api import CompactedSession

    return CompactedSession(path, model_path, **kwargs)


def info(path: str) -> dict:
    """Everything a session file records, checked, without loading a model."""
    from .sessionfile import read_info

    return read_info(path)
