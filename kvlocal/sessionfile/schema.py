"""The session file's schema: its fields, what they must hold, how they are built from a
compaction, what must match the model that reloads it, and what ``kvlocal info`` prints."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from .. import __version__
from ..errors import KvlocalError

FORMAT_VERSION = 1
ARCH = "kvlocal-session"
_P = "kvlocal."


class SessionFileError(KvlocalError):
    """A session file is missing, corrupt, of another version, or does not fit."""


# field -> type; "str", "u32", "f32", "bool", "i32s" (int32 array), "json"
FIELDS = {
    "format_version": "u32",
    "kvlocal_version": "str",
    "created": "str",
    "native.llama_cpp_python": "str",
    "native.patch_hash": "str",
    "native.bias_abi": "u32",
    "model.name": "str",
    "model.arch": "str",
    "model.n_layer": "u32",
    "model.n_head": "u32",
    "model.n_head_kv": "u32",
    "model.head_dim": "u32",
    "model.n_embd": "u32",
    "model.n_vocab": "u32",
    "model.n_ctx_train": "u32",
    "model.rope": "str",
    "model.file_sha256": "str",
    "model.tokenizer_sha256": "str",
    "cache.logical_length": "u32",
    "cache.n_cells": "u32",
    "cache.layers": "i32s",
    "cache.has_swa": "bool",
    "doc.start": "u32",
    "doc.end": "u32",
    "doc.n_prefix": "u32",
    "doc.n_suffix": "u32",
    "doc.prefix_tokens": "i32s?",  # absent when empty (GGUF has no empty arrays)
    "doc.suffix_tokens": "i32s?",
    "chat.messages": "json",
    "chat.n_tokens": "u32",
    "chat.tokens": "i32s?",  # the conversation's exact tokens after the document, replayed on load
    "compaction.method": "str",
    "compaction.ratio": "f32",
    "compaction.queries": "str",
    "compaction.budgets": "str",
    "compaction.report": "json",
    "checksum.meta": "str",  # SHA-256 over every other field, canonically encoded
    "checksum.sha256": "str",  # SHA-256 over the tensors
}
_CHECKSUMS = ("checksum.meta", "checksum.sha256")
MAX_NAME = 255  # characters of a document name (compaction.report["document"])


@dataclass
class SessionData:
    meta: dict  # the FIELDS above (without the "kvlocal." prefix)
    positions: np.ndarray  # int32 [N]
    keys: list[np.ndarray]  # per compacted layer [N, H_kv, d] float16
    values: list[np.ndarray]
    bias: list[np.ndarray]  # float32 [N, H_kv]
    origin: list[np.ndarray]  # int32 [N, H_kv]
    swa_state: bytes | None = None
    extra: dict = field(default_factory=dict)

    @property
    def layer_ids(self) -> list[int]:
        return list(self.meta["cache.layers"])

    @property
    def prefix_tokens(self) -> list[int]:
        return list(self.meta.get("doc.prefix_tokens", []))

    @property
    def suffix_tokens(self) -> list[int]:
        return list(self.meta.get("doc.suffix_tokens", []))


def _canonical(value, kind: str):
    """A field as it reads back from the file (float32 rounding, JSON round trip)."""
    if value is None:
        return None
    kind = kind.rstrip("?")
    if kind == "f32":
        return float(np.float32(value))
    if kind == "json":
        return json.loads(json.dumps(value))
    if kind == "i32s":
        return [int(v) for v in value]
    return {"str": str, "u32": int, "bool": bool}[kind](value)


def meta_checksum(meta: dict) -> str:
    canon = {k: _canonical(meta.get(k), kind) for k, kind in FIELDS.items() if k not in _CHECKSUMS}
    canon = {k: v for k, v in canon.items() if v is not None and v != []}  # absent and empty read back alike
    return hashlib.sha256(json.dumps(canon, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


# fields that must equal the reloading model's fingerprint (kvlocal.engine.modelinfo)
MODEL_KEYS = ("model.arch", "model.n_layer", "model.n_head", "model.n_head_kv", "model.head_dim", "model.n_embd",
              "model.n_vocab", "model.tokenizer_sha256", "model.file_sha256")


def build_meta(model, snapshot, cache, layout, tokens: list[int], base: int, messages: list,
               report: dict) -> dict:
    """The metadata of a compacted session: the build, the model's fingerprint, the cache and
    document layout, the conversation after ``base`` and the compaction ``report`` (the API's
    summary with its timings)."""
    from ..engine import binding
    from ..engine.modelinfo import model_fingerprint

    info = binding.native_info()
    return {
        "kvlocal_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "native.llama_cpp_python": str(info.get("llama_cpp_python", "")),
        "native.patch_hash": str(info.get("patch_hash", "")), "native.bias_abi": binding.BIAS_ABI_VERSION,
        **model_fingerprint(model),
        "cache.logical_length": cache.logical_length, "cache.n_cells": cache.n_cells,
        "cache.layers": list(snapshot.layer_ids), "cache.has_swa": snapshot.swa_section() is not None,
        "doc.start": layout.doc_start, "doc.end": layout.doc_end, "doc.prefix_tokens": tokens[: layout.doc_start],
        "doc.suffix_tokens": tokens[layout.doc_end: layout.length], "chat.messages": messages,
        "chat.tokens": tokens[base:],
        "compaction.method": report["method"], "compaction.ratio": report["ratio"],
        # GGUF writers drop empty strings: a method without query sources says "none"
        "compaction.queries": ",".join(report["queries"]) or "none", "compaction.budgets": report["budgets"],
        "compaction.report": report,
    }


def check_compatible(m: dict, model, path) -> None:
    """Raise ``SessionFileError`` unless ``model`` and this llama.cpp build can reload the session."""
    from ..engine import binding
    from ..engine.modelinfo import model_fingerprint

    fp = model_fingerprint(model)
    for key in MODEL_KEYS:
        if fp[key] != m[key]:
            raise SessionFileError(
                f"{path} was compacted with {m['model.name']} ({key.split('.', 1)[1]} {m[key]!s:.16}), "
                f"not with {fp['model.name']} ({fp[key]!s:.16}): reload it with the model it was made with")
    info = binding.native_info()
    if m["native.bias_abi"] != binding.BIAS_ABI_VERSION or m["native.patch_hash"] != info.get("patch_hash"):
        raise SessionFileError(
            f"{path} was made with kvlocal patch {m['native.patch_hash'][:12]} (bias ABI {m['native.bias_abi']}), "
            f"this llama.cpp has {str(info.get('patch_hash'))[:12]} (ABI {binding.BIAS_ABI_VERSION}): "
            "compact the document again with this build")


def describe(meta: dict, path) -> list[str]:
    """What ``kvlocal info`` prints about a session file."""
    report = meta["compaction.report"]
    lines = [
        f"{path}: kvlocal session format {meta['format_version']} (kvlocal {meta['kvlocal_version']}, "
        f"created {meta['created']})",
        f"  model      {meta['model.name']} ({meta['model.arch']}, {meta['model.n_layer']} layers, "
        f"{meta['model.n_head']}/{meta['model.n_head_kv']} heads, head dim {meta['model.head_dim']})",
        f"  llama.cpp  llama-cpp-python {meta['native.llama_cpp_python']}, patch {meta['native.patch_hash'][:12]}",
        f"  cache      {meta['cache.n_cells']} cells standing for {meta['cache.logical_length']} tokens "
        f"(document {meta['doc.start']}..{meta['doc.end']}), layers {len(meta['cache.layers'])}"
        + (", with SWA section" if meta["cache.has_swa"] else ""),
        *([f"  document   {report['document']}"] if report.get("document") else []),
        f"  compaction {meta['compaction.method']} at {meta['compaction.ratio']:g}x, queries "
        f"{meta['compaction.queries']}, budgets {meta['compaction.budgets']}"
        + (f", streamed in {report['streamed_chunks']} chunks" if report.get("streamed_chunks") else ""),
    ]
    if report.get("heldout_output_rel_l2") is not None:
        lines.append(f"  quality    held-out attention error {report['heldout_output_rel_l2']:.3f}, "
                     f"mass error {report['heldout_mass_err']:.3f}")
    if report.get("timings"):
        lines.append("  timings    " + ", ".join(f"{k} {v:.2f}" for k, v in report["timings"].items()))
    summ = report.get("summary")
    if summ:
        lines.append(f"  summary    the model's summary ({summ['summary_tokens']} tokens) stands for a "
                     f"{summ['document_tokens']}-token document that was not kept: summary "
                     f"{summ['document_tokens'] / summ['summary_tokens']:.1f}x, then {meta['compaction.method']} "
                     f"{summ['am_ratio']:.1f}x = {summ['overall_ratio']:g}x overall")
        st = summ.get("settings")
        if st:
            how = "greedy" if st["temperature"] == 0 else f"temperature {st['temperature']:g}, seed {st['seed']}"
            guard = f"no {st['no_repeat_ngram']}-gram twice" if st["no_repeat_ngram"] else "no n-gram guard"
            lines.append(f"             written {how}, at most {st['max_tokens']} tokens, {guard}")
    online = report.get("online") or []
    lines.append(f"  chat       {len(meta['chat.messages'])} messages"
                 + (f", compacted {len(online)} times while it ran" if online else ""))
    return lines


def _count(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _number(v, lo: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= lo and v == v


def _valid_summary(x) -> bool:
    return (isinstance(x, dict) and isinstance(x.get("text"), str) and bool(x["text"].strip())
            and _count(x.get("document_tokens"), 1) and _count(x.get("summary_tokens"), 1)
            and _number(x.get("seconds"), 0) and _number(x.get("am_ratio"), 1) and _number(x.get("overall_ratio"), 1)
            and (x.get("settings") is None or _valid_summary_settings(x["settings"])))


def _valid_summary_settings(x) -> bool:
    """How a summary was written (absent from files of kvlocal before it was recorded)."""
    return (isinstance(x, dict) and _count(x.get("max_tokens"), 1) and _count(x.get("seed"), 0)
            and _number(x.get("temperature"), 0) and _count(x.get("no_repeat_ngram"), 0)
            and x["no_repeat_ngram"] != 1 and isinstance(x.get("instruction"), str) and bool(x["instruction"].strip()))


def check_meta(m: dict, path) -> None:
    def bad(msg):
        raise SessionFileError(f"{path}: {msg}")

    for key in ("model.n_layer", "model.n_head", "model.n_head_kv", "model.head_dim", "cache.n_cells",
                "cache.logical_length"):
        if m[key] < 1:
            bad(f"{key} must be positive")
    if m["model.n_head"] % m["model.n_head_kv"]:
        bad("query heads do not split into the KV heads")
    layers = m["cache.layers"]
    if not layers or len(set(layers)) != len(layers) or not all(0 <= il < m["model.n_layer"] for il in layers):
        bad("cache.layers must list distinct layers of the model")
    if m["cache.n_cells"] > m["cache.logical_length"]:  # never more cells than the tokens they stand for
        bad("more cells than the logical length")
    if not m["doc.start"] <= m["doc.end"] <= m["cache.logical_length"]:
        bad("document range outside the logical length")
    for key, n_key in (("doc.prefix_tokens", "doc.n_prefix"), ("doc.suffix_tokens", "doc.n_suffix"),
                       ("chat.tokens", "chat.n_tokens")):
        toks = m.get(key, [])
        if len(toks) != m[n_key] or any(not 0 <= t < m["model.n_vocab"] for t in toks):
            bad(f"{key} does not match its count or the vocabulary")
    if m["doc.n_prefix"] != m["doc.start"]:
        bad("protected prefix length disagrees with the document start")
    msgs = m["chat.messages"]
    if not isinstance(msgs, list) or not all(
            isinstance(x, dict) and set(x) == {"role", "content"} and x["role"] in ("system", "user", "assistant")
            and isinstance(x["content"], str) for x in msgs):
        bad("chat.messages must be a list of {role, content}")
    if not isinstance(m["compaction.report"], dict):
        bad("compaction.report must be an object")
    summary = m["compaction.report"].get("summary")
    if summary is not None and not _valid_summary(summary):
        bad("the summary record must hold its text, token counts, time and ratios")
    name = m["compaction.report"].get("document")
    if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME):
        bad(f"the document name must be a non-empty string of at most {MAX_NAME} characters")
    if not m["compaction.ratio"] > 1:
        bad("compaction.ratio must be > 1")
    for key in ("checksum.meta", "checksum.sha256", "model.file_sha256", "model.tokenizer_sha256"):
        v = m[key]
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            bad(f"{key} is not a SHA-256 hex digest")


