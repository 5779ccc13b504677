"""The engine core in its own process (`prefixserve serve`, engine/process.py): the same answers as the
engine in-process, a killed engine answers 503 fast and comes back, N API workers on one engine."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import torch

from prefixserve.engine import EngineConfig, EngineCore, OfflineEngine, SamplingParams

from .helpers import PROMPTS, collect, sse_events, start_server


def children(pid: int) -> list[int]:
    """The direct child processes of `pid`, started by any of its threads (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return found


def engine_pid(api_pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in children(api_pid):
            if "prefixserve.engine" in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " "):
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no engine process under {api_pid}")


def test_answers_equal_the_in_process_engine(tiny_model, tiny_model_dir, tmp_path):
    core = OfflineEngine(EngineCore(tiny_model, EngineConfig(max_running=8)))
    cases = [(p, SamplingParams(max_new_tokens=12)) for p in PROMPTS[:3]]
    cases.append((PROMPTS[1], SamplingParams(max_new_tokens=40, temperature=0.8, seed=3)))
    rid = core.add_request(PROMPTS[0], SamplingParams(max_new_tokens=60, ignore_eos=True))
    free_text = collect(core.run_to_completion()[rid])[2]
    stop = free_text[len(free_text) // 2 : len(free_text) // 2 + 3]  # a stop string that occurs
    cases.append((PROMPTS[0], SamplingParams(max_new_tokens=60, stop=(stop,), ignore_eos=True)))
    expected = []
    for text, params in cases:
        rid = core.add_request(text, params)
        expected.append(collect(core.run_to_completion()[rid]))
    proc, url = start_server(tiny_model_dir, tmp_path)
    try:
        for (text, params), (tokens, _, want) in zip(cases, expected, strict=True):
            body = {"input": text, "max_new_tokens": params.max_new_tokens, "temperature": params.temperature}
            body |= {"seed": params.seed, "stop": list(params.stop), "ignore_eos": params.ignore_eos}
            got = httpx.post(url + "/generate", json=body, timeout=30).json()
            assert got["text"] == want, (text, params)
            with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=30) as r:
                events = sse_events(r.iter_lines())
            streamed = [t for kind, e in events if kind == "token" for t in e["token_ids"]]
            assert "".join(e["text"] for kind, e in events if kind == "token") == want
            assert streamed == tokens and events[-1][0] == "done"
            assert events[-1][1]["finish_reason"] == ("stop" if params.stop else "length")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_killed_engine_fails_requests_in_flight_fast_and_is_started_again(tiny_model_dir, tmp_path):
    proc, url = start_server(tiny_model_dir, tmp_path)
    try:
        first = engine_pid(proc.pid)
        long = {"input": "The Eagle", "max_new_tokens": 200, "ignore_eos": True}
        results: dict[str, object] = {}

        def whole() -> None:  # a non-streaming request in flight
            results["whole"] = httpx.post(url + "/generate", json=long, timeout=30)

        t = threading.Thread(target=whole)
        with httpx.stream("POST", url + "/generate", json={**long, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()
            head = [next(lines), next(lines)]  # the first token arrived
            os.kill(first, signal.SIGSTOP)  # frozen: the stream cannot finish before the kill
            t.start()
            time.sleep(0.2)  # the whole request reaches the API and waits on the engine
            os.kill(first, signal.SIGKILL)
            killed = time.monotonic()
            events = sse_events([*head, *lines])
            ended = time.monotonic() - killed
        t.join(10)
        assert events[0][0] == "token" and events[-1][0] == "error", events[-3:]
        assert events[-1][1]["error"]["type"] == "unavailable" and ended < 5, ended
        whole = results["whole"]
        assert whole.status_code == 503 and whole.headers["retry-after"], whole.text
        assert httpx.get(url + "/ready", timeout=5).status_code == 503  # while it starts again
        refused = httpx.post(url + "/generate", json={"input": "x", "max_new_tokens": 2}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "unavailable"
        deadline = time.monotonic() + 60
        while httpx.get(url + "/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the engine was not started again"
            time.sleep(0.1)
        assert engine_pid(proc.pid) != first
        again = httpx.post(url + "/generate", json={"input": "The Eagle", "max_new_tokens": 5}, timeout=30)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "starting it again" in proc.stdout.read().decode(errors="replace")


def test_api_workers_share_one_engine(tiny_model_dir, tmp_path, redis_url):
    proc, url = start_server(
        tiny_model_dir, tmp_path, PREFIXSERVE_REDIS_URL=redis_url, PREFIXSERVE_API_WORKERS="2"
    )
    try:
        workers = [
            p for p in children(proc.pid) if "prefixserve.serve" in Path(f"/proc/{p}/cmdline").read_text()
        ]
        engines = [
            p for p in children(proc.pid) if "prefixserve.engine" in Path(f"/proc/{p}/cmdline").read_text()
        ]
        assert len(workers) == 2 and len(engines) == 1
        body = {"input": "The Eagle", "max_new_tokens": 6}
        want = httpx.post(url + "/generate", json=body, timeout=30).json()["text"]
        answers: list[str] = []

        def call() -> None:
            with httpx.Client(timeout=30) as c:  # a new connection each: spread over the workers
                answers.append(c.post(url + "/generate", json=body).json()["text"])

        threads = [threading.Thread(target=call) for _ in range(12)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert answers == [want] * 12
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    for pid in workers + engines:  # all stopped with it
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_the_engine_loop_drops_malformed_frames_and_answers_in_one_message_per_step(tiny_model, tmp_path):
    """The wire without a subprocess: an EngineLoop on a thread, a DEALER as the client."""
    import msgspec
    import zmq

    from prefixserve.engine.process import EngineLoop
    from prefixserve.engine.wire import Add, Hello, Step, Welcome, encode, from_engine

    core = EngineCore(tiny_model, EngineConfig(max_running=4))
    address = f"ipc://{tmp_path}/engine.sock"
    loop = EngineLoop(core, address, evict=lambda pid: None)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    try:
        sock.send(b"\x93not-a-message")  # garbage, then a frame of the wrong type: both dropped
        sock.send(msgspec.msgpack.encode({"type": "add", "request_id": 5}))
        sock.send(encode(Hello()))
        assert sock.poll(5000)
        welcome = from_engine.decode(sock.recv())
        assert isinstance(welcome, Welcome) and welcome.engine_id == loop.engine_id
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        for i in range(2):
            sock.send(encode(Add(f"r{i}", [5, 6, 7], params, None, 0)))
        tokens: dict[str, list[int]] = {"r0": [], "r1": []}
        finished, sizes = set(), []
        while len(finished) < 2:
            assert sock.poll(5000)
            msg = from_engine.decode(sock.recv())
            if isinstance(msg, Step):
                sizes.append(len(msg.outputs))
                for out in msg.outputs:
                    tokens[out.request_id] += out.token_ids
                    if out.finish_reason is not None:
                        finished.add(out.request_id)
        ref = EngineCore(tiny_model)
        rid = ref.add_request([5, 6, 7], params)
        assert tokens["r0"] == tokens["r1"] == collect(ref.run_to_completion()[rid])[0]
        assert 2 in sizes  # both rows' tokens of a step in one message
    finally:
        loop.stopping = True
        thread.join(5)
        sock.close()


def test_an_api_process_whose_engine_and_training_run_elsewhere_holds_no_model(
    tiny_model, tiny_model_dir, tmp_path, redis_url
):
    """Engine in its own process, training on Redis workers: the API process keeps the tokenizer and the
    config; the engine compiles text prefixes and sends the model's names and upload bounds."""
    from prefixserve.compile import RemoteModel, bind_model, text_to_kv
    from prefixserve.engine.runner import compile_prefix

    from .helpers import A, settings_for
    from .live import LiveServer

    settings = settings_for(tmp_path, model=str(tiny_model_dir), redis_url=redis_url, engine_process=True)
    server = LiveServer(settings, None).start()
    try:
        held = server.state.model
        assert isinstance(held, RemoteModel) and not hasattr(held, "weights")
        assert (held.fingerprint, held.served_name) == (tiny_model.fingerprint, tiny_model.served_name)
        assert server.state.service.expect.bounds == bind_model(tiny_model).bounds  # derived by the engine
        text = "Answer briefly and politely.\n"
        made = httpx.post(server.url + "/prefixes", json={"text": text}, headers=A, timeout=30)
        assert made.status_code == 201, made.text
        stored = server.state.service.load_state(made.json()["id"]).kv
        torch.testing.assert_close(stored, text_to_kv(text, tiny_model, 64))  # what a local model makes
        embeds = torch.randn(5, tiny_model.spec.n_embd, generator=torch.Generator().manual_seed(1))  # [P, C]
        torch.testing.assert_close(held.compile_embeds(embeds), compile_prefix(tiny_model, embeds=embeds))
        too_long = httpx.post(server.url + "/prefixes", json={"text": "word " * 100}, headers=A)
        assert too_long.status_code == 422 and "at most 64" in too_long.json()["error"]["message"]
        body = {"input": PROMPTS[0], "prefix_id": made.json()["id"], "max_new_tokens": 4}
        answer = httpx.post(server.url + "/generate", json=body, headers=A, timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4, answer.text
    finally:
        server.stop()
