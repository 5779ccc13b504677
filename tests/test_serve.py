"""`prefixserve serve` as a real process: graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from prefix_store.redis_server import free_port
from prefixserve.tiny import TinyModelConfig, write_tiny_model


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    """Big enough that a long generation takes seconds, small enough to build in one."""
    cfg = TinyModelConfig(n_layer=8, n_head=8, n_embd=384, n_positions=1024)
    return write_tiny_model(tmp_path_factory.mktemp("slow-gpt2"), cfg)


def start_server(model_dir, tmp_path, **env_over) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PREFIXSERVE_MODEL": str(model_dir),
        "PREFIXSERVE_AUTH": "false",
        "PREFIXSERVE_DATA_DIR": str(tmp_path),
        "PREFIXSERVE_PORT": str(port),
        "PREFIXSERVE_SHUTDOWN_GRACE_S": "30",
        "HF_HUB_OFFLINE": "1",
        **env_over,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefixserve.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start:\n" + proc.stdout.read().decode(errors="replace"))
        time.sleep(0.1)


def test_sigterm_stops_admitting_and_finishes_in_flight_requests(slow_model_dir, tmp_path):
    proc, url = start_server(slow_model_dir, tmp_path)
    try:
        events = []
        req = {"input": "The Eagle", "max_new_tokens": 600, "stream": True}
        with httpx.stream("POST", url + "/generate", json=req, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("event: token")
            proc.send_signal(signal.SIGTERM)  # mid-generation
            time.sleep(0.3)
            try:  # new work is not admitted: the listener is closed, or the request gets 503
                refused = httpx.post(url + "/generate", json={"input": "x", "max_new_tokens": 1}, timeout=2)
                assert refused.status_code == 503, refused.text
            except httpx.ConnectError:
                pass
            for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert "finish_reason" in events[-1], events[-1]  # the in-flight request ran to its end
        assert events[-1]["usage"]["completion_tokens"] > 1
        # uvicorn shuts down cleanly, then re-raises the captured SIGTERM as its exit status
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode(errors="replace")
        assert "Finished server process" in log and "Traceback" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
