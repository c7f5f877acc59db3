"""`kvlocal serve`: a real server on 127.0.0.1, talked to with the official openai client."""

from __future__ import annotations

import concurrent.futures as cf
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from scipy.special import logsumexp

from conftest import TEXT
from kvlocal.api import CompactedSession, Compaction
from kvlocal.errors import KvlocalError
from kvlocal.server import check_host, create_app
from kvlocal.server.sessions import SessionPool, StopText, common_prefix

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

QUESTION = "What is the magic number for the lighthouse?"
OTHER = ("The old mill by the river ground wheat for the village until the flood of the spring. "
         "After the flood the miller built a new wheel of oak, and the children came to watch it turn. ") * 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread of this process (so tests can read the pool's counters)."""

    def __init__(self, pool: SessionPool):
        self.pool, self.port = pool, _free_port()
        config = uvicorn.Config(create_app(pool, max_tokens=24), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.pool.close()  # the model is the fixture's: borrowed, not closed


@pytest.fixture(scope="module")
def files(smollm2_path, tmp_path_factory):
    from kvlocal.engine import binding

    out = tmp_path_factory.mktemp("served")
    model = binding.Model(smollm2_path)
    paths = []
    for name, text in (("lighthouse", TEXT * 2), ("mill", OTHER)):
        with Compaction(model, progress=False) as kv:
            kv.ingest(text, name=f"{name}.txt")
            kv.compact(ratio=4, method="am-highest", queries="repeat")
            kv.save(str(out / f"{name}.kvs"))
        paths.append(out / f"{name}.kvs")
    yield model, paths
    model.close()


@pytest.fixture(scope="module")
def server(files):
    model, paths = files
    srv = Server(SessionPool(paths, model, max_loaded=1))
    yield srv
    srv.close()


def _ask(srv, messages, model="lighthouse", **kw):
    kw.setdefault("temperature", 0)
    return srv.client.chat.completions.create(model=model, messages=messages, **kw)


# ---------------------------------------------------------------------------------------------

def test_models_lists_every_session_with_what_it_holds(server, files):
    cards = {m.id: m for m in server.client.models.list().data}
    assert set(cards) == {"lighthouse", "mill"}
    raw = httpx.get(f"{server.url}/models").json()["data"]
    light = next(c for c in raw if c["id"] == "lighthouse")
    assert light["document"] == "lighthouse.txt" and light["method"] == "am-highest" and light["ratio"] == 4
    assert 0 < light["cells"] < light["tokens"]
    assert server.client.models.retrieve("mill").id == "mill"


def test_greedy_answer_equals_kvlocal_ask_streamed_or_not(server, files):
    model, paths = files
    with CompactedSession(str(paths[0]), model) as s:
        expected = s.ask(QUESTION, max_tokens=24)
    r = _ask(server, [{"role": "user", "content": QUESTION}], max_tokens=24)
    assert r.choices[0].message.content.strip() == expected and expected
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    pieces, finish = [], None
    for chunk in _ask(server, [{"role": "user", "content": QUESTION}], max_tokens=24, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces).strip() == expected and len([p for p in pieces if p]) > 1
    assert finish == r.choices[0].finish_reason


def _reference(path, model, first, second, n_tokens=16):
    """What reusing the first request's cells must give: the same decodes in the same steps on a
    fresh load of the file (first prompt, its greedy answer, rewind to the common prefix, the rest
    of the second prompt), so the same logits to the bit on any machine - reuse is exact
    bookkeeping, not an approximation.  Returns (tokens reused, the second answer, its tokens'
    log-probabilities)."""
    with CompactedSession(str(path), model) as ref:  # common_prefix: imported before any test plants a bug
        s = ref.session
        p1 = [int(t) for t in s.chat_tokens(first)]
        held = p1 + list(ref.continue_tokens(p1, max_tokens=n_tokens))
        p2 = [int(t) for t in s.chat_tokens(second)]
        n = min(common_prefix(held, p2), len(p2) - 1)
        s.rewind(ref.base + n)
        steps = list(ref.continue_tokens(p2[n:], max_tokens=n_tokens, with_logits=True))
    lps = [float(z[t] - logsumexp(np.asarray(z, np.float64))) for t, z in steps]
    return n, model.detokenize([t for t, _ in steps]), np.array(lps)


def _logprobs(answer) -> np.ndarray:
    return np.array([x.logprob for x in answer.choices[0].logprobs.content])


LOGPROB_ATOL = 1e-9  # two float64 log-softmax formulas over the same float32 logits


SECOND = "Say your last answer again, word for word."


def test_a_growing_conversation_decodes_only_its_new_tokens_and_answers_as_from_scratch(server, files):
    model, paths = files
    with server.pool.use("lighthouse") as served:  # from the file's state, as the reference starts
        served.conv.restart()
    first = [{"role": "user", "content": QUESTION}]
    a1 = _ask(server, first, max_tokens=16)
    before = served.stats["decoded_tokens"]
    second = first + [{"role": "assistant", "content": a1.choices[0].message.content},
                      {"role": "user", "content": SECOND}]
    a2 = _ask(server, second, max_tokens=16, logprobs=True, top_logprobs=2)
    cached = a2.usage.prompt_tokens_details.cached_tokens
    assert cached >= a1.usage.prompt_tokens  # the first prompt at least, and what of its answer re-tokenizes alike
    assert served.stats["decoded_tokens"] - before == a2.usage.prompt_tokens - cached
    assert a2.usage.prompt_tokens - cached < a2.usage.prompt_tokens // 2
    n, want, lps = _reference(paths[0], model, first, second)
    assert cached == n and a2.choices[0].message.content == want
    assert np.abs(_logprobs(a2) - lps).max() <= LOGPROB_ATOL  # the same logits, to the bit
    top = a2.choices[0].logprobs.content[0].top_logprobs
    assert len(top) == 2 and top[0].logprob >= top[1].logprob
    s = served.conv.session  # the bookkeeping: what the session holds after its base is `held`
    assert s.n_past == served.conv.base + len(served.held) and s.tokens[-len(served.held):] == served.held


@pytest.mark.parametrize("planted", ["a stale token kept", "a prompt token lost"])
def test_a_planted_reuse_bug_is_caught(files, monkeypatch, planted):
    """The comparison above must be able to fail: a reuse that keeps one token of the previous
    answer the new prompt does not have, or loses one it has, answers something else."""
    from kvlocal.server import sessions

    model, paths = files
    pool = SessionPool(paths[:1], model)
    try:
        first = [{"role": "user", "content": QUESTION}]
        greedy = sessions.sampler_for(0, 1, 0)
        with pool.use("lighthouse") as served:
            a1 = served.generate(first, max_tokens=16, sampler=greedy, stops=[]).text()
            # the client sends back only part of the answer: the cells hold tokens past the common prefix
            second = first + [{"role": "assistant", "content": a1[: len(a1) // 2].strip()},
                              {"role": "user", "content": SECOND}]
            if planted == "a stale token kept":
                real = sessions.common_prefix
                monkeypatch.setattr(sessions, "common_prefix", lambda a, b: real(a, b) + 1)
            else:
                real = sessions.ServedSession._reuse

                def lossy(self, prompt):
                    n = real(self, prompt)
                    self.conv.session.rewind(self.conv.base + n - 1)
                    return n
                monkeypatch.setattr(sessions.ServedSession, "_reuse", lossy)
            gen = served.generate(second, max_tokens=16, sampler=greedy, stops=[], logprobs=0)
            gen.text()
        got = np.array([x["logprob"] for x in gen.logprobs])
        want = _reference(paths[0], model, first, second)[2]
        n = min(len(got), len(want))
        assert n and np.abs(got[:n] - want[:n]).max() > 1e3 * LOGPROB_ATOL
    finally:
        pool.close()


def test_concurrent_requests_are_served_one_at_a_time_per_session(server):
    before = server.pool.sessions["lighthouse"].stats["requests"]
    msgs = [[{"role": "user", "content": q}] for q in (QUESTION, "Who kept the lamp?", "What came in spring?")]
    with cf.ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(_ask, server, m, model=name, max_tokens=8)
                for m in msgs for name in ("lighthouse", "mill")]
        answers = [f.result() for f in futs]
    assert all(a.choices[0].message.content for a in answers)
    assert server.pool.sessions["lighthouse"].stats["requests"] - before == 3
    assert len(server.pool.loaded) <= 1  # max_loaded=1: the sessions took turns in memory
    # the same question gets the same greedy answer however the requests interleaved
    again = _ask(server, msgs[0], model="lighthouse", max_tokens=8)
    assert again.choices[0].message.content == answers[0].choices[0].message.content


def test_stop_strings_end_the_answer_before_them(server):
    full = _ask(server, [{"role": "user", "content": QUESTION}], max_tokens=24).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, "premise: an answer of a few words"
    stop = " " + words[2]
    r = _ask(server, [{"role": "user", "content": QUESTION}], max_tokens=24, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in _ask(
        server, [{"role": "user", "content": QUESTION}], max_tokens=24, stop=stop, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content


def test_errors_come_as_the_openai_api_shapes_them(server):
    with pytest.raises(openai.NotFoundError) as e:
        _ask(server, [{"role": "user", "content": "hi"}], model="nope")
    assert e.value.body["code"] == "model_not_found" and "lighthouse" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("nope")
    for bad in ({"model": "lighthouse", "messages": []},
                {"model": "lighthouse", "messages": [{"role": "user", "content": "hi"}], "n": 2},
                {"model": "lighthouse", "messages": [{"role": "robot", "content": "hi"}]},
                {"model": "lighthouse", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
                {"model": "lighthouse", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}):
        r = httpx.post(f"{server.url}/chat/completions", json=bad)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", bad
    r = httpx.post(f"{server.url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_a_conversation_that_does_not_fit_gets_a_400_with_the_sizes(files):
    model, paths = files
    strict = Server(SessionPool(paths[:1], model, online=None))  # kvlocal serve --no-compact
    try:
        with pytest.raises(openai.BadRequestError) as e:
            _ask(strict, [{"role": "user", "content": "word " * 3000}], max_tokens=4)
        assert e.value.body["code"] == "context_length_exceeded"
        assert "cells" in e.value.body["message"] and "tokens" in e.value.body["message"]
        r = _ask(strict, [{"role": "user", "content": QUESTION}], max_tokens=4)  # and it still serves
        assert r.choices[0].message.content and r.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        strict.close()


def test_a_conversation_longer_than_the_context_compacts_itself(files):
    from kvlocal.online import OnlineSettings

    model, paths = files
    online = OnlineSettings(max_context=320, keep_recent=64, method="am-highest")  # small, to be quick
    srv = Server(SessionPool(paths[1:], model, online=online))
    try:
        long = [{"role": "user", "content": ("Tell me about the mill. " * 12).strip()}]
        for i in range(3):
            long += [{"role": "assistant", "content": ("The wheel turned and the wheat was ground. " * 8).strip()},
                     {"role": "user", "content": f"And then, part {i}?"}]
        r = _ask(srv, long, model="mill", max_tokens=8)
        served = srv.pool.sessions["mill"]
        assert r.choices[0].message.content and r.usage.prompt_tokens + served.conv.base > online.max_context
        assert served.conv.online_records  # it compacted rather than refused
        # the next turn reuses what the compacted conversation holds
        more = long + [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "Go on."}]
        r2 = _ask(srv, more, model="mill", max_tokens=8)
        assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens
        # a conversation that differs inside the compacted part starts again from the file
        restarts = served.stats["restarts"]
        other = [{"role": "user", "content": "Something else entirely?"}]
        assert _ask(srv, other, model="mill", max_tokens=8).choices[0].message.content
        assert served.stats["restarts"] == restarts + 1 and not served.conv.online_records
    finally:
        srv.close()


def test_start_up_refuses_bad_files_and_remote_hosts(files, tmp_path, load_model):
    model, paths = files
    with pytest.raises(KvlocalError, match="named 'lighthouse'"):
        SessionPool([paths[0], paths[0]], model)
    with pytest.raises(KvlocalError, match="compacted with"):
        SessionPool(paths, load_model("llama-gqa"))
    broken = tmp_path / "broken.kvs"
    broken.write_bytes(paths[0].read_bytes()[:1000])
    with pytest.raises(KvlocalError):
        SessionPool([broken], model)
    with pytest.raises(KvlocalError, match="allow-remote"):
        check_host("0.0.0.0", allow_remote=False)
    check_host("0.0.0.0", allow_remote=True)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_host(host, allow_remote=False)


def test_stop_text_holds_back_only_what_may_start_a_stop_string():
    st = StopText(["END", "##"])
    out = [st.feed(p) for p in ("ab", "cE", "N", "x#", "y", "E", "ND", "more")]
    assert out == ["ab", "c", "", "ENx", "#y", "", "", ""] and st.hit
    st = StopText(["END"])
    assert st.feed("abE") == "ab" and st.flush() == "E" and not st.hit
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0


def test_cli_serve_refuses_remote_hosts_and_files_of_another_model(files, load_model, capsys):
    from kvlocal.cli import main as cli

    model, paths = files
    assert cli(["serve", str(paths[0]), "-m", str(model.path), "--host", "0.0.0.0"]) == 1
    assert "--allow-remote" in capsys.readouterr().err
    tiny = load_model("llama-gqa")
    assert cli(["serve", *map(str, paths), "-m", str(tiny.path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compacted with" in err and "lighthouse.kvs" in err


def test_the_document_name_is_saved_checked_and_shown(files, capsys, tmp_path):
    from kvlocal.cli import main as cli

    model, paths = files
    assert cli(["info", str(paths[1])]) == 0
    assert "document   mill.txt" in capsys.readouterr().out
    with Compaction(model, progress=False) as kv:
        for bad in ("", " ", "x" * 256, 7):
            with pytest.raises(KvlocalError, match="document name"):
                kv.ingest(TEXT, name=bad)


def test_a_reloaded_sessions_token_history_follows_rewinds(files):
    """A reloaded session knows only the tokens it decoded itself (its history starts after the
    document): a rewind drops the last ones, not those past the document's length."""
    model, paths = files
    with CompactedSession(str(paths[0]), model) as s:
        s.chat("Hello.", max_tokens=4)
        kept = list(s.session.tokens)
        assert kept and len(kept) < s.session.n_past
        s.ask(QUESTION, max_tokens=4)  # decoded, then rewound
        assert s.session.tokens == kept
        s.restart()  # the file's state injected again: the conversation's tokens go with its cells
        assert s.session.tokens == [] and s.conversation_tokens == []


def test_serve_without_the_server_extra_says_how_to_get_it(monkeypatch):
    import importlib.util

    from kvlocal import server

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(KvlocalError, match=r"pip install 'kvlocal\[server\]' \(missing: uvicorn\)"):
        server.serve(["x.kvs"], "model.gguf")
