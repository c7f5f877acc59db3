"""Fuzz the session-file reader: mutated files must raise SessionFileError or load intact.

Builds one real session file (tiny random llama model, generated), then reads N mutated copies:
byte flips, truncations, insertions, zeroed runs, field-value swaps from a second valid file.
Any other exception, a crash, or a file that loads with different metadata or tensors is a
failure.  Deterministic for a seed.

    python bench/fuzz_sessions.py [-n 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from common import machine, write_report

TEXT = ("The special magic number for the lighthouse is 4817263. Margaret kept the lamp burning every night "
        "of the long winter, and the ships that passed the point saw it and were glad.")


def mutate(rng: random.Random, blob: bytes, other: bytes) -> tuple[str, bytes]:
    b = bytearray(blob)
    kind = rng.choice(["flip", "flips", "truncate", "insert", "zero", "splice-other", "header-flip"])
    if kind == "flip":
        b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
    elif kind == "flips":
        for _ in range(rng.randint(2, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == "truncate":
        b = b[: rng.randrange(len(b))]
    elif kind == "insert":
        p = rng.randrange(len(b))
        b[p:p] = rng.randbytes(rng.randint(1, 64))
    elif kind == "zero":
        p = rng.randrange(len(b))
        b[p:p + rng.randint(1, 256)] = bytes(min(256, len(b) - p))
    elif kind == "splice-other":
        p = rng.randrange(min(len(b), len(other)))
        n = rng.randint(1, 512)
        b[p:p + n] = other[p:p + n]
    else:  # the header region, where counts, lengths and types live
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(len(b), 4096))] = rng.randrange(256)
    return kind, bytes(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from kvlocal.api import Compaction
    from kvlocal.sessionfile import SessionFileError, read_session
    from models import tiny

    work = Path(tempfile.mkdtemp())
    model = tiny.ensure_tiny(work, "llama-gqa")
    files = []
    for ratio in (4, 5):
        with Compaction(str(model), progress=False) as kv:
            kv.ingest(TEXT)
            kv.compact(ratio=ratio, queries="context")
            kv.chat("Hello", max_tokens=4)
            kv.save(str(work / f"s{ratio}.kvs"))
        files.append((work / f"s{ratio}.kvs").read_bytes())
    blob, other = files
    original = read_session(work / "s4.kvs")
    rng = random.Random(args.seed)
    outcome = collections.Counter()
    by_kind = collections.defaultdict(collections.Counter)
    failures = []
    path = work / "fuzz.kvs"
    t0 = time.perf_counter()
    for i in range(args.n):
        kind, data = mutate(rng, blob, other)
        path.write_bytes(data)
        try:
            got = read_session(path)
        except SessionFileError:
            result = "refused"
        except Exception:  # noqa: BLE001 - exactly what the fuzzer looks for
            result = "other exception"
            failures.append((i, kind, traceback.format_exc(limit=3)))
        else:
            same = got.meta == original.meta and all(
                np.array_equal(a, c) for a, c in zip(got.keys + got.values + got.bias + got.origin,
                                                     original.keys + original.values + original.bias + original.origin,
                                                     strict=True))
            result = "loaded intact" if same else "loaded garbage"
            if not same:
                failures.append((i, kind, "loaded with different content"))
        outcome[result] += 1
        by_kind[kind][result] += 1
    secs = time.perf_counter() - t0
    lines = [
        "# Session-file reader fuzzing",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `bench/fuzz_sessions.py -n {args.n} --seed {args.seed}` on "
        f"{machine(1)}; {secs:.0f} s.",
        "",
        f"Base file: a real session of a tiny random llama model ({len(blob)} bytes, with a saved chat turn); "
        f"{args.n} mutated copies read with `read_session`.",
        "",
        "| outcome | files |",
        "|---|---|",
    ] + [f"| {k} | {outcome[k]} |" for k in ("refused", "loaded intact", "other exception", "loaded garbage")] + [
        "",
        "| mutation | refused | loaded intact | other exception | loaded garbage |",
        "|---|---|---|---|---|",
    ] + [f"| {k} | {c['refused']} | {c['loaded intact']} | {c['other exception']} | {c['loaded garbage']} |"
         for k, c in sorted(by_kind.items())] + [
        "",
        "Pass: every file is refused with SessionFileError or loads byte-for-byte what was saved "
        "(a mutation of alignment padding, say)." + (" **All passed.**" if not failures else
                                                      f" **{len(failures)} failures**, first: {failures[0]}"),
    ]
    write_report("fuzz_sessions", lines)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
