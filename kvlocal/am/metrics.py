"""How well a compacted head reproduces its block on (held-out) queries."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from .fit import compacted_attention
from .problem import HeadProblem, HeadResult


def head_errors(p: HeadProblem, res: HeadResult) -> dict:
    """Relative L2 error of the block-local attention output, and mean |mass ratio - 1|,
    over the queries of ``p`` (the original block's keys, values and bias)."""
    st = p.stats()
    Y = st.outputs
    if res.t == 0:
        return {"output_rel_l2": 1.0, "mass_err": 1.0}
    X = compacted_attention(p, res.indices, res.beta)
    out = np.linalg.norm(X @ res.values.astype(np.float64) - Y) / max(np.linalg.norm(Y), 1e-30)
    lse_orig = st.m.astype(np.float64) + np.log(st.z)
    s = p.logits(keys=res.indices).astype(np.float64) + res.beta.astype(np.float32).astype(np.float64)
    lse_comp = logsumexp(s, axis=1)
    mass = np.abs(np.expm1(lse_comp - lse_orig))
    return {"output_rel_l2": float(out), "mass_err": float(mass.mean())}
