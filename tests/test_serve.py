"""`prefixserve serve` as a real process: graceful shutdown on SIGTERM, one auth behaviour."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from prefixserve.tiny import TinyModelConfig, write_tiny_model

from .helpers import start_server


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    """Big enough that a long generation takes seconds, small enough to build in one."""
    cfg = TinyModelConfig(n_layer=8, n_head=8, n_embd=384, n_positions=1024)
    return write_tiny_model(tmp_path_factory.mktemp("slow-gpt2"), cfg)


def assert_refused_while_draining(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1 and response.headers["connection"] == "close"
    assert response.json()["error"]["type"] == "unavailable"


def test_sigterm_stops_admitting_and_finishes_in_flight_requests(slow_model_dir, tmp_path):
    """During the grace period the listener stays open: every new request (on a new connection or an
    idle keep-alive one) gets 503 + Retry-After, the request in flight runs to its end, then the
    process exits without waiting out the grace period."""
    proc, url = start_server(slow_model_dir, tmp_path)
    try:
        events = []
        req = {"input": "The Eagle", "max_new_tokens": 600, "stream": True}
        with httpx.Client(base_url=url, timeout=10) as kept:
            assert kept.get("/ready").status_code == 200  # a keep-alive connection, idle from now on
            with httpx.stream("POST", url + "/generate", json=req, timeout=60) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("event: token")
                proc.send_signal(signal.SIGTERM)  # mid-generation
                time.sleep(0.3)
                new = {"input": "x", "max_new_tokens": 1}
                assert_refused_while_draining(httpx.post(url + "/generate", json=new, timeout=5))
                assert_refused_while_draining(httpx.get(url + "/prefixes", timeout=5))
                assert_refused_while_draining(httpx.get(url + "/ready", timeout=5))
                assert_refused_while_draining(kept.post("/generate", json=new))
                for line in lines:
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                finished = time.monotonic()
        assert "finish_reason" in events[-1], events[-1]  # the in-flight request ran to its end
        assert events[-1]["usage"]["completion_tokens"] > 1
        # uvicorn shuts down cleanly, then re-raises the captured SIGTERM as its exit status
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert time.monotonic() - finished < 10  # once nothing is in flight, not after the 30 s grace
        log = proc.stdout.read().decode(errors="replace")
        assert "Finished server process" in log and "Traceback" not in log, log
        assert "draining: 1 requests in flight" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_auth_is_on_exactly_when_keys_are_configured(tiny_model_dir, tmp_path):
    """`prefixserve serve` and scripts/serve.sh behave alike: no keys, no auth (said at start-up)."""
    unset = {"PREFIXSERVE_AUTH": None, "PREFIXSERVE_API_KEYS": None, "PREFIXSERVE_API_KEYS_FILE": None}
    proc, url = start_server(tiny_model_dir, tmp_path / "open", **unset)
    try:
        r = httpx.post(url + "/prefixes", json={"text": "no keys here\n"})
        assert r.status_code == 201 and r.json()["owner"] == "default"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "authentication is OFF" in proc.stdout.read().decode(errors="replace")
    keyed = {**unset, "PREFIXSERVE_API_KEYS": "acme:acme-key-0123456789"}
    proc, url = start_server(tiny_model_dir, tmp_path / "keyed", **keyed)
    try:
        assert httpx.get(url + "/prefixes").status_code == 401
        ok = httpx.get(url + "/prefixes", headers={"Authorization": "Bearer acme-key-0123456789"})
        assert ok.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # no keys beyond loopback: refused at start, before anything listens
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXSERVE_")}
    env |= {"PREFIXSERVE_HOST": "0.0.0.0", "PREFIXSERVE_MODEL": str(tiny_model_dir)}
    run = subprocess.run(
        [sys.executable, "-m", "prefixserve.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "refusing to serve on 0.0.0.0 without authentication" in run.stderr
