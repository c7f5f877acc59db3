"""``kvlocal serve``: compacted sessions behind an OpenAI-compatible HTTP API.

    from kvlocal.server import serve
    serve(["demo.kvs"], "SmolLM2-135M-Instruct.Q4_1.gguf", port=8000)

or, to embed it: ``create_app(SessionPool([...], model))`` is an ASGI app.  Needs the ``server``
extra (``pip install 'kvlocal[server]'``: FastAPI, uvicorn).
"""

from __future__ import annotations

import importlib.util
import ipaddress
from collections.abc import Sequence

from ..errors import KvlocalError
from ..online import OnlineSettings

LOOPBACK_NAMES = ("localhost",)


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse to listen beyond this machine unless asked to in so many words."""
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host in LOOPBACK_NAMES
    if not loopback and not allow_remote:
        raise KvlocalError(f"serving on {host} would let other machines read the sessions and use this one's "
                           "CPU: pass --allow-remote (allow_remote=True) if that is meant")


def _require():
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise KvlocalError("kvlocal serve needs the server extra: pip install 'kvlocal[server]' "
                           f"(missing: {', '.join(missing)})")


def create_app(pool, *, max_tokens: int = 256):
    _require()
    from .app import create_app as make

    return make(pool, max_tokens=max_tokens)


def serve(paths: Sequence[str], model, *, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
          max_loaded: int = 2, online: OnlineSettings | None = OnlineSettings(), threads: int | None = None,
          max_tokens: int = 256, log_level: str = "info") -> None:
    """Serve ``paths`` (session files of ``model``) until interrupted; every file is checked first."""
    check_host(host, allow_remote)
    _require()
    import uvicorn

    from .sessions import SessionPool

    pool = SessionPool(paths, model, max_loaded=max_loaded, online=online, threads=threads)
    try:
        uvicorn.run(create_app(pool, max_tokens=max_tokens), host=host, port=port, log_level=log_level)
    finally:
        pool.close()
