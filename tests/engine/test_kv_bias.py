"""The patched native op: a per-cell, per-KV-head attention-logit bias in llama.cpp's KV cache.

Exactness identities on tiny random models (llama GQA 2:1, MQA, qwen2, gemma3 iSWA) and on
SmolLM2-135M (GQA 3:1, 30 layers; see conftest.ALL_MODELS for its two encodings):
  * bias on and all zero  == bias off, bit for bit;
  * a cell duplicated     == that cell once with bias log 2 (every head, every layer);
  * bias -inf on a cell   == the cell removed from the restored state, and bit for bit the
                             cell masked out of the sequence in place;
  * a bias on KV head g changes exactly the query heads h with h // n_rep == g, and by the
    predicted amount p * exp(beta) / sum(p * exp(beta)).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import ALL_MODELS, SMOOTH_MODELS, TEXT, TINY_VARIANTS, ctx_kwargs
from kvlocal.engine import binding
from kvlocal.errors import EngineError
from tolerance import assert_identity, reorder_noise, take_base_cells, tolerance


def make_ctx(model, name: str | None = None, **kw):
    kw = {"n_ctx": 512, "n_batch": 128, **ctx_kwargs(name or ""), **kw}
    return binding.Context(model, **kw)


def prefill(ctx) -> tuple[np.ndarray, bytes]:
    tokens = ctx.model.tokenize(TEXT)
    ctx.decode(tokens, pos=0, logits="none")
    return tokens, ctx.seq_state(0)


def restore(ctx, blob: bytes) -> None:
    ctx.clear()
    ctx.set_seq_state(blob)


def next_token(model) -> int:
    return int(model.tokenize(" and", add_special=False)[-1])


def base_layers(model) -> list[int]:
    """Layers whose K/V live in the base (global) cache: all layers unless the model is iSWA."""
    return [il for il, swa in enumerate(model.swa_layers()) if not swa]


def edit_base_cells(model, blob: bytes, idx) -> bytes:
    """The blob with the base cache's cells replaced by cells ``idx`` (repeats allowed)."""
    return take_base_cells(blob, idx, n_caches=2 if model.n_swa else 1)


def set_cell_bias(ctx, layers, n_cells: int, cell, value: float) -> None:
    for il in layers:
        b = np.zeros((n_cells, ctx.model.n_head_kv), np.float32)
        b[cell] = value
        ctx.bias_set(il, b)


def decoder(ctx, model, T: int):
    """blob -> logits of the next token decoded after restoring it."""
    def run(blob: bytes) -> np.ndarray:
        restore(ctx, blob)
        return ctx.decode([next_token(model)], pos=T)
    return run


@pytest.mark.parametrize("name", ALL_MODELS)
def test_zero_bias_is_bit_identical(load_model, name):
    model = load_model(name)
    tokens = model.tokenize(TEXT)
    with make_ctx(model, name) as ctx:
        off = ctx.decode(tokens, pos=0, logits="all")
        blob = ctx.seq_state(0)
        restore(ctx, blob)
        off_next = ctx.decode([next_token(model)])

        ctx.clear()
        ctx.bias_enable(True)
        on = ctx.decode(tokens, pos=0, logits="all")
        restore(ctx, blob)
        for il in base_layers(model):
            ctx.bias_set(il, np.zeros((len(tokens), model.n_head_kv), np.float32))
        on_next = ctx.decode([next_token(model)])
    assert np.array_equal(off, on)
    assert np.array_equal(off_next, on_next)


# cells J duplicated == bias log 2 on them; cells J removed == bias -inf on them
CELL_EDITS = {
    "duplicate": (np.log(2.0), lambda T, J: [c for i in range(T) for c in ([i, i] if i in J else [i])]),
    "remove": (-np.inf, lambda T, J: [i for i in range(T) if i not in J]),
}


@pytest.mark.parametrize("edit", list(CELL_EDITS))
@pytest.mark.parametrize("name", SMOOTH_MODELS)
def test_edited_cells_equal_their_bias(load_model, name, edit):
    """Within a tolerance measured from the engine's reorder noise (tests/tolerance.py): first and
    last cells alone, then a set of cells, against which three planted bugs must miss widely."""
    value, cells = CELL_EDITS[edit]
    model = load_model(name)
    with make_ctx(model, name, kv_bias=True) as ctx:
        tokens, blob = prefill(ctx)
        T = len(tokens)
        run = decoder(ctx, model, T)
        noise, plain = reorder_noise(run, blob, T, n_caches=2 if model.n_swa else 1)
        tol = tolerance(noise, plain)

        def biased(J, v=value):
            restore(ctx, blob)
            set_cell_bias(ctx, base_layers(model), T, J, v)
            return ctx.decode([next_token(model)], pos=T)

        for J in ([0], [T - 2], sorted({0, 1, T // 3, T // 2, T - 2} | set(range(3, T - 2, 4)))):
            edited = run(edit_base_cells(model, blob, cells(T, set(J))))
            planted = {}
            if len(J) > 1:  # one cell moves the logits by ~1e-2; a set of cells by far more
                planted = {"no bias": plain, "bias one cell off": biased([j + 1 for j in J]),
                           "bias only on the first cell": biased(J[:1])}
            assert_identity(biased(J), edited, tol, planted, f"{edit} cells {J[:6]}")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_neg_inf_bias_is_bitwise_the_cell_masked_out(load_model, name):
    """Same cell layout on both sides: the cell leaves sequence 0 (kept by sequence 1, so the new
    token does not reuse it) versus bias -inf.  Bit-identical, also on the quantized model."""
    model = load_model(name)
    with make_ctx(model, name, kv_bias=True, n_seq_max=2) as ctx:
        tokens, blob = prefill(ctx)
        T = len(tokens)
        for j in (0, T // 3, T - 2):
            restore(ctx, blob)
            ctx.seq_cp(0, 1, j, j + 1)
            assert ctx.seq_rm(0, j, j + 1)
            masked_out = ctx.decode([next_token(model)], pos=T)
            ctx.seq_rm(1)

            restore(ctx, blob)
            for il in range(model.n_layer):
                # an iSWA model's SWA cache holds the last n cells; seq_rm also left them there
                n = ctx.bias_cells(il)
                if j >= T - n:
                    set_cell_bias(ctx, [il], n, j - (T - n), -np.inf)
            biased = ctx.decode([next_token(model)], pos=T)
            assert np.array_equal(masked_out, biased), f"cell {j}"


def capture_softmax(model, name: str, blob: bytes, T: int, bias: dict | None = None) -> dict[int, np.ndarray]:
    """kq_soft_max of every layer for one decoded token after restoring ``blob``.

    Returns {il: [n_head, n_kv]}; ``bias`` maps layer -> [T, n_head_kv].
    """
    tap = binding.TensorTap()
    got: dict[int, np.ndarray] = {}
    with make_ctx(model, name, tap=tap, kv_bias=True) as ctx:
        restore(ctx, blob)
        for il, b in (bias or {}).items():
            ctx.bias_set(il, b)
        tap.select = lambda name, op: name.startswith("kq_soft_max-")
        tap.sink = lambda name, op, a: got.__setitem__(int(name.rsplit("-", 1)[1]), a[0, :, 0, :])
        ctx.decode([next_token(model)], pos=T)
    return got


@pytest.mark.parametrize("name", TINY_VARIANTS + ["smollm2", "qwen25"])
def test_bias_on_one_kv_head_changes_only_its_group(load_model, name, rng):
    model = load_model(name)
    with make_ctx(model, name) as ctx:
        tokens, blob = prefill(ctx)
    T, n_rep = len(tokens), model.n_head // model.n_head_kv
    il = base_layers(model)[0]
    ref = capture_softmax(model, name, blob, T)
    for g in range(model.n_head_kv):
        beta = np.zeros((T, model.n_head_kv), np.float32)
        beta[:, g] = rng.uniform(-3, 3, T)
        got = capture_softmax(model, name, blob, T, {il: beta})

        for lower in range(il):  # layers before il see nothing of the bias
            assert np.array_equal(got[lower], ref[lower])
        group = [h for h in range(model.n_head) if h // n_rep == g]
        moved = 0.0  # how far the bias moved the group's attention (a real model's head may sit on one cell)
        for h in range(model.n_head):
            if h not in group:
                assert np.array_equal(got[il][h], ref[il][h]), f"head {h} is not in group {g}"
                continue
            p = ref[il][h]
            b_ext = np.zeros_like(p)
            b_ext[:T] = beta[:, g]  # restored cells are 0..T-1, the new token is cell T (bias 0)
            want = p * np.exp(b_ext)
            want /= want.sum()
            assert np.abs(got[il][h] - want).max() <= 2e-5, f"head {h}"
            moved = max(moved, float(np.abs(got[il][h] - p).max()))
        assert moved > 1e-3, f"the bias did not move group {g}: the check above says nothing"


@pytest.mark.parametrize("name", TINY_VARIANTS)
def test_bias_get_set_and_new_cells_start_at_zero(load_model, name, rng):
    model = load_model(name)
    layers = base_layers(model)
    with make_ctx(model, kv_bias=True) as ctx:
        tokens, blob = prefill(ctx)
        T = len(tokens)
        assert ctx.bias_cells(layers[0]) == T
        stored = {il: rng.normal(size=(T, model.n_head_kv)).astype(np.float32) for il in layers}
        for il, b in stored.items():
            ctx.bias_set(il, b)
        for il, b in stored.items():
            assert np.array_equal(ctx.bias_get(il), b)

        ctx.decode([next_token(model)], pos=T)
        for il, b in stored.items():
            after = ctx.bias_get(il)
            assert after.shape == (T + 1, model.n_head_kv)
            assert np.array_equal(after[:T], b)
            assert not after[T].any()

        # a cell freed and reused by a new token starts at 0 again
        assert ctx.seq_rm(0, T, -1)
        ctx.decode([next_token(model)], pos=T)
        assert not ctx.bias_get(layers[0])[T].any()

        # restored cells start at 0
        restore(ctx, blob)
        assert not any(ctx.bias_get(il).any() for il in layers)


@pytest.mark.parametrize("name", ["llama-gqa", "gemma3"])
def test_bias_api_rejects_bad_calls(load_model, name):
    model = load_model(name)
    with make_ctx(model) as ctx:
        tokens, _ = prefill(ctx)
        T = len(tokens)
        assert ctx.bias_cells(0) == -1  # not enabled yet
        with pytest.raises(EngineError, match="bias disabled"):
            ctx.bias_get(0)
        ctx.bias_enable(True)
        with pytest.raises(EngineError, match=r"must be \["):
            ctx.bias_set(0, np.zeros((T + 1, model.n_head_kv)))
        with pytest.raises(EngineError, match="no KV cache"):
            ctx.bias_set(model.n_layer, np.zeros((T, model.n_head_kv)))
        assert ctx.bias_cells(0, seq_id=-1) == -1
        assert ctx.bias_cells(0, seq_id=1) == 0  # a valid, empty sequence
        ctx.bias_enable(False)
        assert ctx.bias_cells(0) == -1


def test_toggling_the_bias_rebuilds_the_graph(load_model):
    """Graph reuse must not keep a stale bias input across enable/disable."""
    model = load_model("llama-gqa")
    with make_ctx(model) as ctx:
        tokens, blob = prefill(ctx)
        T = len(tokens)
        restore(ctx, blob)
        plain = ctx.decode([next_token(model)], pos=T)

        ctx.bias_enable(True)
        restore(ctx, blob)
        set_cell_bias(ctx, range(model.n_layer), T, 0, 4.0)
        biased = ctx.decode([next_token(model)], pos=T)

        ctx.bias_enable(False)
        restore(ctx, blob)
        again = ctx.decode([next_token(model)], pos=T)
    assert np.abs(biased - plain).max() > 1e-3
    assert np.array_equal(again, plain)


def test_flash_attention_context_takes_the_bias(load_model, rng):
    """A context created with flash attention (V not transposed) falls back to the biased path."""
    model = load_model("llama-gqa")
    out, noise = [], []
    for fa in (False, True):
        with make_ctx(model, flash_attn=fa, kv_bias=True) as ctx:
            tokens, blob = prefill(ctx)
            T = len(tokens)
            plain = ctx.decode([next_token(model)], pos=T)  # the planted bug: the bias ignored
            run = decoder(ctx, model, T)

            def biased(b):
                restore(ctx, blob)
                for il in range(model.n_layer):
                    ctx.bias_set(il, b[il])
                return ctx.decode([next_token(model)], pos=T)

            noise.append(reorder_noise(run, blob, T, n_caches=1)[0])
            local = np.random.default_rng(7)
            bias = [local.normal(size=(T, model.n_head_kv)).astype(np.float32) for _ in range(model.n_layer)]
            out.append(biased(bias))
    assert_identity(out[1], out[0], tolerance(max(noise), out[0]), {"bias ignored": plain}, "flash attention")


def test_iswa_bias_touches_only_the_base_cache(load_model, rng):
    model = load_model("gemma3")
    swa = model.swa_layers()
    assert swa == [True, True, False, True, True, False]
    base = base_layers(model)
    with make_ctx(model, kv_bias=True) as ctx:
        tokens, blob = prefill(ctx)
        T = len(tokens)
        for il in base:
            ctx.bias_set(il, rng.normal(size=(T, model.n_head_kv)).astype(np.float32))
        # the bias lives beside the cache: the state (base and SWA sections) is unchanged
        assert ctx.seq_state(0) == blob
        for il in range(model.n_layer):
            if swa[il]:
                n = ctx.bias_cells(il)
                assert 0 < n <= model.n_swa  # the SWA cache only holds the window
                assert not ctx.bias_get(il).any()
    ref = capture_softmax(model, "gemma3", blob, T)
    beta = rng.uniform(-3, 3, (T, model.n_head_kv)).astype(np.float32)
    got = capture_softmax(model, "gemma3", blob, T, {base[0]: beta})
    for il in range(base[0]):  # SWA layers before the first global layer: untouched
        assert np.array_equal(got[il], ref[il])
    assert np.abs(got[base[0]] - ref[base[0]]).max() > 1e-3
