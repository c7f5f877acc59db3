"""kvlocal: compact the KV cache of a local GGUF model with Attention Matching."""
__version__ = "0.1.0"
