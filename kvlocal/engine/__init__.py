"""The engine layer: everything that talks to llama.cpp.

``binding`` (the only module that touches ctypes), ``modelinfo`` (supported architectures, the
model fingerprint), ``session`` (one llama.cpp context: ingestion, generation, snapshot/inject),
``capture`` (post-RoPE queries and KVzip scores through the eval callback), ``queries`` (query
sources by name) and ``sampling``.  Nothing here imports ``kvlocal.am`` or the product modules.
"""
