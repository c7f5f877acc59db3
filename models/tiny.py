"""Random-weight tiny GGUF models for unit tests, written with the ``gguf`` package.

Variants (all with an SPM byte-fallback vocabulary and a ChatML template):

* ``llama-gqa``: llama, 4 query heads / 2 KV heads (GQA 2:1)
* ``llama-mqa``: llama, 4 query heads / 1 KV head (MQA)
* ``qwen2``: qwen2, q/k/v projection biases, NEOX RoPE, GQA 2:1
* ``qwen3``: qwen3, per-head q/k RMS norms before RoPE, NEOX RoPE, GQA 2:1
* ``gemma3``: gemma3 with iSWA: window 8, every 3rd layer global, q/k norms

The weights are random (seeded), so these models are only good for exactness tests:
the files are deterministic for a given variant and seed.

    python -m models.tiny OUT_DIR [VARIANT ...]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# a few whole-word pieces so that English text does not tokenize to bytes only
_PIECES = ["▁the", "▁a", "▁of", "▁and", "▁to", "▁in", "▁is", "▁was", "▁he", "▁she", "▁it", "▁that",
           "▁for", "▁on", "▁with", "▁as", "▁his", "▁her", "▁at", "▁by", "▁cat", "▁sat", "▁mat", "▁number",
           "▁magic", "▁special", "e", "t", "a", "o", "i", "n", "s", "r", "h", "l", "d", "▁"]


@dataclass(frozen=True)
class TinySpec:
    arch: str
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    n_ff: int = 128
    n_ctx: int = 2048
    rope_base: float = 10000.0
    qkv_bias: bool = False
    qk_norm: bool = False
    n_swa: int = 0
    swa_pattern: int = 0


VARIANTS: dict[str, TinySpec] = {
    "llama-gqa": TinySpec("llama", n_head=4, n_head_kv=2),
    "llama-mqa": TinySpec("llama", n_head=4, n_head_kv=1),
    "qwen2": TinySpec("qwen2", n_head=4, n_head_kv=2, rope_base=1e6, qkv_bias=True),
    "qwen3": TinySpec("qwen3", n_head=4, n_head_kv=2, rope_base=1e6, qk_norm=True),
    "gemma3": TinySpec("gemma3", n_layer=6, n_head=4, n_head_kv=1, head_dim=16, n_swa=8, swa_pattern=3,
                       qk_norm=True),
}


def _vocab():
    import gguf

    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
             gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += _PIECES
    types += [gguf.TokenType.NORMAL] * len(_PIECES)
    scores = [0.0] * (5 + 256) + [-float(i) for i in range(len(_PIECES))]
    return tokens, scores, types


def write_tiny(path: str | Path, variant: str, seed: int = 0, arch: str | None = None) -> Path:
    """Write the tiny model ``variant`` to ``path`` (deterministic for a given seed); ``arch``
    relabels its architecture (for tests of architectures kvlocal does not support)."""
    import gguf

    spec = VARIANTS[variant] if arch is None else replace(VARIANTS[variant], arch=arch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab, E, D = len(tokens), spec.n_embd, spec.head_dim
    H, Hkv, F = spec.n_head, spec.n_head_kv, spec.n_ff

    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), spec.arch)
    w.add_name(f"kvlocal-tiny-{variant}")
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(E)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(1e-6)
    if spec.n_swa:
        w.add_sliding_window(spec.n_swa)
        w.add_sliding_window_pattern(spec.swa_pattern)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(4 if spec.arch != "llama" else 2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(spec.arch not in ("qwen2", "qwen3"))
    w.add_chat_template(CHATML_TEMPLATE)

    def rnd(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", rnd(n_vocab, E, std=1.0))
    w.add_tensor("output_norm.weight", norm(E))
    if spec.arch != "gemma3":
        w.add_tensor("output.weight", rnd(n_vocab, E))
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(E))
        # q/k scale chosen so that attention logits have a spread of about 1.5: neither
        # uniform nor one-hot, so that biases and removed cells visibly change the output
        w.add_tensor(p + "attn_q.weight", rnd(H * D, E, std=0.15))
        w.add_tensor(p + "attn_k.weight", rnd(Hkv * D, E, std=0.15))
        w.add_tensor(p + "attn_v.weight", rnd(Hkv * D, E))
        w.add_tensor(p + "attn_output.weight", rnd(E, H * D))
        if spec.qkv_bias:
            w.add_tensor(p + "attn_q.bias", rnd(H * D, std=0.5))
            w.add_tensor(p + "attn_k.bias", rnd(Hkv * D, std=0.5))
            w.add_tensor(p + "attn_v.bias", rnd(Hkv * D))
        if spec.qk_norm:
            w.add_tensor(p + "attn_q_norm.weight", norm(D))
            w.add_tensor(p + "attn_k_norm.weight", norm(D))
        if spec.arch == "gemma3":
            w.add_tensor(p + "post_attention_norm.weight", norm(E))
            w.add_tensor(p + "post_ffw_norm.weight", norm(E))
        w.add_tensor(p + "ffn_norm.weight", norm(E))
        w.add_tensor(p + "ffn_gate.weight", rnd(F, E))
        w.add_tensor(p + "ffn_up.weight", rnd(F, E))
        w.add_tensor(p + "ffn_down.weight", rnd(E, F))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def ensure_tiny(directory: str | Path, variant: str, seed: int = 0) -> Path:
    """Path of the tiny model in ``directory``, writing it first if missing."""
    path = Path(directory) / f"tiny-{variant}-s{seed}.gguf"
    if not path.exists():
        write_tiny(path, variant, seed)
    return path


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    out, variants = Path(argv[0]), argv[1:] or list(VARIANTS)
    for v in variants:
        print(ensure_tiny(out, v))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
