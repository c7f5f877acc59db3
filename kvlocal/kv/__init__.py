"""The KV data layer, numpy only (importable without llama.cpp).

``statecodec`` (llama.cpp's sequence-state blobs, parsed and written byte for byte), ``cache``
(per-layer K/V snapshots, the compacted-cache layout and its checks) and ``queryset`` (reference
queries per layer).  ``kvlocal.am`` builds on this package alone.
"""
