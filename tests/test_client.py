"""The client SDK and its command line against a live server (tiny model)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from prefixserve_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    JobFailed,
    Overloaded,
    PermissionDenied,
    PrefixNotFound,
    ServerError,
    ValidationError,
)
from prefixserve_client._plot import BARS, sparkline
from safetensors.torch import save as st_save

from prefix_store.format import PrefixMeta, encode_prefix
from prefixserve.training.synthetic import table_to_text

from .helpers import ALICE, BOB, wait_until

ROOT = Path(__file__).resolve().parents[1]
FAST_TRAIN = {"epochs": 2, "prefix_len": 4, "hidden": 16, "batch_size": 8, "learning_rate": 5e-3}


@pytest.fixture(scope="module")
def live(module_live_server):
    return module_live_server()


@pytest.fixture
def client(live):
    with Client(live.url, api_key=ALICE, max_retries=0) as c:
        yield c


def native_file(model, path: Path) -> Path:
    meta = PrefixMeta(
        id="pfx-native", model_fingerprint=model.fingerprint, prefix_len=3, dtype="float32", owner="x"
    )
    path.write_bytes(encode_prefix(torch.randn(model.spec.prefix_shape(3)), meta))
    return path


def peft_dir(model, path: Path) -> Path:
    spec = model.spec
    path.mkdir()
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "PREFIX_TUNING",
                "task_type": "CAUSAL_LM",
                "num_virtual_tokens": 5,
                "num_layers": spec.n_layer,
                "num_attention_heads": spec.n_head,
                "token_dim": spec.n_embd,
            }
        )
    )
    (path / "adapter_model.safetensors").write_bytes(
        st_save({"prompt_embeddings": torch.randn(5, spec.n_layer * 2 * spec.n_embd)})
    )
    return path


def test_every_sdk_call(client, tiny_model, tmp_path, capsys):
    text = client.prefixes.from_text("Answer briefly.\n", name="brief", visibility="public")
    native = client.prefixes.upload(native_file(tiny_model, tmp_path / "p.safetensors"), name="native")
    peft = client.prefixes.upload(peft_dir(tiny_model, tmp_path / "adapter"))
    assert (text.source, native.source, peft.source) == ("text", "upload", "peft")
    assert (native.name, native.prefix_len, peft.prefix_len) == ("native", 3, 5)
    assert {text.id, native.id, peft.id} <= {p.id for p in client.prefixes.list()}
    assert client.prefixes.get(native.id) == native
    result = client.generate(text.id, "name : Aromi", max_new_tokens=6, temperature=0.7, seed=5)
    assert result.usage.completion_tokens == 6 and result.usage.prefix_tokens == text.prefix_len
    pieces = list(client.stream(text.id, "name : Aromi", max_new_tokens=6, temperature=0.7, seed=5))
    assert len(pieces) == 6 and "".join(pieces) == result.text
    bare = client.generate(None, "Hello", max_new_tokens=3, stop=["\n"])
    assert bare.prefix_id is None
    client.prefixes.delete(native.id)
    with pytest.raises(PrefixNotFound):
        client.prefixes.get(native.id)
    job = client.prefixes.train(
        [{"input": x, "output": y} for x, y in table_to_text(16)], name="sdk", **FAST_TRAIN
    )
    assert job.state.status == "queued" and client.jobs.get(job.id).id == job.id
    trained = job.wait(progress=True, poll_s=0.05, timeout=60)
    assert trained.source == "train" and trained.name == "sdk" and trained.prefix_len == 4
    assert job.state.step == job.state.total_steps == 4 and len(job.state.losses) == 4
    err = capsys.readouterr().err
    assert "epoch" in err and "step 4/4" in err and "loss" in err


def test_training_from_a_jsonl_path_and_cancel(client):
    data = ROOT / "examples" / "data.jsonl"  # the example dataset of the README and docs/training.md
    job = client.prefixes.train(data, epochs=100, prefix_len=4, hidden=16, batch_size=4)
    assert job.state.n_examples == len(data.read_text().splitlines()) == 60
    deadline = time.monotonic() + 30
    while job.refresh().status != "running" or job.state.step == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    job.cancel()
    with pytest.raises(JobFailed, match="cancelled"):
        job.wait(poll_s=0.05, timeout=30)


def test_each_error_type(live, client):
    with pytest.raises(PrefixNotFound) as nf:
        client.generate("pfx-unknown00", "x")
    assert nf.value.status == 404 and nf.value.type == "prefix_not_found"
    with pytest.raises(ValidationError, match="top_p") as ve:
        client.generate(None, "x", top_p=2.0)
    assert ve.value.status == 422
    with pytest.raises(ValidationError, match="exceeds the model's n_positions"):
        client.generate(None, "x", max_new_tokens=400)
    with pytest.raises(AuthenticationError), Client(live.url, api_key="wrong-key-0123456789") as bad:
        bad.prefixes.list()
    public = client.prefixes.from_text("shared\n", visibility="public")
    with pytest.raises(PermissionDenied), Client(live.url, api_key=BOB, max_retries=0) as bob:
        bob.prefixes.delete(public.id)
    live.state.draining = True  # 503 on every new request: retried, then ServerError
    try:
        with pytest.raises(ServerError) as se, Client(live.url, api_key=ALICE, max_retries=1) as c:
            c.generate(None, "x")
        assert se.value.status == 503
    finally:
        live.state.draining = False


def test_retries_on_429_honouring_retry_after(live_server, tmp_path):
    from prefixserve.model import load_model
    from prefixserve.tiny import TinyModelConfig, write_tiny_model

    slow = load_model(
        write_tiny_model(
            tmp_path / "slow", TinyModelConfig(n_layer=8, n_head=8, n_embd=384, n_positions=1024)
        )
    )
    server = live_server(slow, max_running=1, max_waiting=1)
    long = {"input": "x", "max_new_tokens": 400}
    blockers = [
        threading.Thread(
            target=httpx.post,
            args=(server.url + "/generate",),
            kwargs={"json": long, "headers": {"Authorization": f"Bearer {ALICE}"}, "timeout": 60},
        )
        for _ in range(2)
    ]
    sched = server.state.engine.core.scheduler
    deadline = time.monotonic() + 10
    for t, (running, waiting) in zip(blockers, [(1, 0), (1, 1)], strict=True):
        t.start()  # one at a time: a second one still pending would itself be refused
        while not (sched.num_running == running and sched.num_waiting == waiting):
            assert time.monotonic() < deadline
            time.sleep(0.002)
    with Client(server.url, api_key=ALICE, max_retries=0) as impatient, pytest.raises(Overloaded) as ov:
        impatient.generate(None, "x", max_new_tokens=1)
    assert ov.value.retry_after >= 1
    with Client(server.url, api_key=ALICE, max_retries=20) as patient:
        assert patient.generate(None, "x", max_new_tokens=1).usage.completion_tokens == 1
    for t in blockers:
        t.join()
    metrics = httpx.get(server.url + "/metrics").text
    assert 'endpoint="/generate",status="429"' in metrics


def recording_keys(client: Client | AsyncClient, on_request=None) -> list[str | None]:
    """The Idempotency-Key of every POST /prefixes the client sends (an httpx event hook)."""
    keys: list[str | None] = []

    def record(request: httpx.Request) -> None:
        if request.method == "POST" and request.url.path == "/prefixes":
            keys.append(request.headers.get("idempotency-key"))
            if on_request is not None:
                on_request(len(keys))

    async def record_async(request: httpx.Request) -> None:
        record(request)

    hook = record_async if isinstance(client, AsyncClient) else record
    client._http.event_hooks["request"].append(hook)
    return keys


def test_sdk_sends_one_idempotency_key_per_call_across_its_503_retries(live, tiny_model, tmp_path):
    """A real 503 (the server draining: Retry-After) on the first attempt, then success."""
    with Client(live.url, api_key=ALICE, max_retries=3) as c:
        refuse_odd = lambda n: setattr(live.state, "draining", n % 2 == 1)  # noqa: E731
        keys = recording_keys(c, refuse_odd)  # every call's first attempt gets 503
        before = {p.id for p in c.prefixes.list()}
        start = time.monotonic()
        made = c.prefixes.from_text("retried instructions\n")
        assert time.monotonic() - start >= 1.0  # it waited for Retry-After: 1
        assert len(keys) == 2 and keys[0] == keys[1] and keys[0] is not None  # one key, resent
        assert {p.id for p in c.prefixes.list()} - before == {made.id}  # one prefix
        keys.clear()
        upload = c.prefixes.upload(native_file(tiny_model, tmp_path / "k.safetensors"))
        job = c.prefixes.train([{"input": x, "output": y} for x, y in table_to_text(8)], **FAST_TRAIN)
        assert len(keys) == 4 and keys[0] == keys[1] and keys[2] == keys[3]  # each call refused once
        assert len({keys[0], keys[2], keys[-1]}) == 2 and upload.id and job.id  # a new key per call
        keys.clear()
        mine = c.prefixes.from_text("my key\n", idempotency_key="order-42")
        assert keys == ["order-42", "order-42"]
        assert c.prefixes.from_text("my key\n", idempotency_key="order-42").id == mine.id
    live.state.draining = False


def test_sdk_retries_a_creation_whose_reply_was_lost(live):
    """The server creates the prefix, then the connection drops before the reply (as if it crashed
    between the two): the SDK resends with the same key and gets the same prefix, not a second one."""
    service = live.state.service
    original = service.add_text
    dropped = threading.Event()

    def add_then_drop_the_connection(*args, **kwargs):
        meta = original(*args, **kwargs)
        if not dropped.is_set():
            for conn in list(live.server.server_state.connections):  # on the event loop, and wait for it
                done = threading.Event()
                conn.loop.call_soon_threadsafe(lambda c=conn, d=done: (c.transport.abort(), d.set()))
                done.wait(5)
            dropped.set()
        return meta

    service.add_text = add_then_drop_the_connection
    try:
        with Client(live.url, api_key=BOB, max_retries=2) as c:
            keys = recording_keys(c)
            before = {p.id for p in c.prefixes.list()}
            made = c.prefixes.from_text("the reply of this one is lost\n")
            assert dropped.is_set() and len(keys) == 2 and keys[0] == keys[1]
            assert {p.id for p in c.prefixes.list()} - before == {made.id}
    finally:
        service.add_text = original


def test_async_sdk_sends_the_same_key_on_retries(live):
    async def main():
        async with AsyncClient(live.url, api_key=ALICE, max_retries=2) as client:
            keys = recording_keys(client, lambda n: setattr(live.state, "draining", n == 1))
            made = await client.prefixes.from_text("async retried\n")
            assert len(keys) == 2 and keys[0] == keys[1] and made.id

    try:
        asyncio.run(main())
    finally:
        live.state.draining = False


def test_async_client(live):
    async def main():
        async with AsyncClient(live.url, api_key=ALICE, max_retries=0) as client:
            prefix = await client.prefixes.from_text("async instructions\n")
            result = await client.generate(prefix.id, "name : Cotto", max_new_tokens=5)
            pieces = [p async for p in client.stream(prefix.id, "name : Cotto", max_new_tokens=5)]
            assert "".join(pieces) == result.text and len(pieces) == 5
            assert prefix.id in {p.id for p in await client.prefixes.list()}
            assert (await client.prefixes.get(prefix.id)).id == prefix.id
            job = await client.prefixes.train(
                [{"input": x, "output": y} for x, y in table_to_text(8)], **FAST_TRAIN
            )
            trained = await job.wait(poll_s=0.05, timeout=60)
            assert trained.source == "train" and (await client.jobs.get(job.id)).state.status == "succeeded"
            await client.prefixes.delete(prefix.id)
            with pytest.raises(PrefixNotFound):
                await client.prefixes.get(prefix.id)

    asyncio.run(main())


# ---- the command line --------------------------------------------------------------------------
def cli(live, *args: str, key: str = ALICE) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFIXSERVE_BASE_URL": live.url, "PREFIXSERVE_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "prefixserve_client.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_commands(live, tiny_model, tmp_path):
    made = cli(live, "prefixes", "from-text", "CLI instructions\n", "--name", "cli")
    assert made.returncode == 0, made.stderr
    pid = json.loads(made.stdout)["id"]
    listed = cli(live, "prefixes", "list")
    assert listed.returncode == 0 and pid in listed.stdout and "cli" in listed.stdout
    up = cli(live, "prefixes", "upload", str(native_file(tiny_model, tmp_path / "n.safetensors")), "--public")
    assert up.returncode == 0 and json.loads(up.stdout)["visibility"] == "public"
    got = cli(live, "prefixes", "get", pid)
    assert json.loads(got.stdout)["name"] == "cli"
    args = [
        "generate",
        "name : Zizzi",
        "--prefix",
        pid,
        "--max-new-tokens",
        "5",
        "--seed",
        "1",
        "--temperature",
        "0.5",
    ]
    gen, streamed = cli(live, *args), cli(live, *args, "--stream")
    assert gen.returncode == streamed.returncode == 0 and gen.stdout == streamed.stdout
    assert "5 tokens" in gen.stderr
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"input": x, "output": y}) for x, y in table_to_text(16)))
    trained = cli(
        live,
        "train",
        str(data),
        "--epochs",
        "2",
        "--prefix-len",
        "4",
        "--hidden",
        "16",
        "--batch-size",
        "8",
        "--poll",
        "0.05",
        "--name",
        "cli-trained",
    )
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout)["source"] == "train" and "step 4/4" in trained.stderr
    queued = cli(live, "train", str(data), "--epochs", "1", "--prefix-len", "2", "--hidden", "8", "--no-wait")
    job_id = queued.stdout.strip()
    plot = tmp_path / "loss.png"
    shown = cli(live, "job", job_id, "--wait", "--poll", "0.05", "--plot", str(plot))
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "succeeded"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000  # a real image
    assert f"loss curve written to {plot}" in shown.stderr
    assert any(bar in shown.stderr for bar in BARS)  # the progress line's sparkline
    jobs = cli(live, "jobs", "--limit", "3")
    assert jobs.returncode == 0, jobs.stderr
    lines = jobs.stdout.splitlines()
    assert lines[1].startswith(job_id) and "succeeded" in lines[1]  # newest first
    assert any(bar in lines[1] for bar in BARS)
    long = cli(live, "train", str(ROOT / "examples" / "data.jsonl"), "--epochs", "100", "--no-wait")
    assert long.returncode == 0, long.stderr
    job_id = long.stdout.strip()
    with Client(live.url, api_key=ALICE) as c:
        wait_until(lambda: c.jobs.get(job_id).state.step > 0)  # running
    cancelled = cli(live, "job", job_id, "--cancel")  # returns once the worker has stopped
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] == "cancelled"
    assert cli(live, "prefixes", "delete", pid).returncode == 0
    missing = cli(live, "prefixes", "get", pid)
    assert missing.returncode == 1 and "PrefixNotFound" in missing.stderr
    denied = cli(live, "prefixes", "list", key="nope-nope-nope-nope")
    assert denied.returncode == 1 and "AuthenticationError" in denied.stderr


def test_sdk_installs_and_works_without_torch(live, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [
            *(str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"),
            *("-c", str(ROOT / "requirements" / "lock.txt"), str(ROOT / "client")),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    script = f"""
import importlib.util, sys
from prefixserve_client import Client
assert importlib.util.find_spec("torch") is None, "torch must not be installed"
with Client({live.url!r}, api_key={ALICE!r}) as c:
    print(c.generate(None, "Hello", max_new_tokens=3).usage.completion_tokens)
assert "torch" not in sys.modules
"""
    run = subprocess.run([str(py), "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "3"
    # the deployment smoke test needs nothing but the SDK either
    smoke = [str(py), str(ROOT / "scripts" / "smoke.py"), "--base-url", live.url, "--api-key", ALICE]
    run = subprocess.run(
        [*smoke, "--ready-timeout", "30"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "smoke test passed" in run.stdout


def test_sparkline_scales_and_buckets():
    assert sparkline([]) == ""
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([1.0] * 5) == "▅▅▅▅▅"
    line = sparkline([float(x) for x in range(100, 0, -1)], width=10)
    assert len(line) == 10 and line[0] == "█" and line[-1] == "▁"
    assert list(line) == sorted(line, key=BARS.index, reverse=True)  # falling values, falling bars
