"""Helpers the test modules share (one place: no test module imports another's helpers). Fixtures
live in conftest.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import httpx
import torch

from prefix_store.format import PrefixMeta, encode_prefix
from prefix_store.redis_server import free_port
from prefix_store.service import PrefixService
from prefix_store.state import NtkPrefix
from prefixserve.model import LoadedModel
from prefixserve.settings import ServerSettings
from prefixserve.training.jobs import Job
from prefixserve.training.synthetic import table_to_text
from prefixserve.training.trainer import TrainConfig

# ---- a live server's tenants, settings and waits -------------------------------------------------
ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789ab"


A = {"Authorization": f"Bearer {ALICE}"}


B = {"Authorization": f"Bearer {BOB}"}


def settings_for(tmp_path, **over) -> ServerSettings:
    base = dict(
        data_dir=str(tmp_path),
        api_keys=f"alice:{ALICE},bob:{BOB}",
        max_running=4,
        max_waiting=4,
        max_upload_bytes=256 * 1024,
        max_prefix_len=64,
    )
    return ServerSettings(**{**base, **over})


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def wait_job(api, job_id: str, headers=A, timeout: float = 120) -> dict:
    """Poll a job until it leaves queued/running; -> its last state."""
    deadline = time.monotonic() + timeout
    while (job := httpx.get(api.url + f"/jobs/{job_id}", headers=headers).json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def text_prefix(api, headers, text="Answer briefly.\n", visibility="private") -> dict:
    r = httpx.post(api.url + "/prefixes", json={"text": text, "visibility": visibility}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


# ---- prefixes ------------------------------------------------------------------------------------
def native_file(model, p=4) -> bytes:
    meta = PrefixMeta(
        id="pfx-upload", model_fingerprint=model.fingerprint, prefix_len=p, dtype="float32", owner="z"
    )
    return encode_prefix(torch.randn(model.spec.prefix_shape(p)), meta)


# ---- engine inputs -------------------------------------------------------------------------------
PROMPTS = [
    "name : Aromi | food : Italian | area : riverside",
    "The Eagle",
    "Blue Spice is a cheap restaurant in the north. It is",
    "x",
    "price : high | name : Zizzi",
    "Cotto serves French food near the city centre and",
]


def make_prefixes(model: LoadedModel, lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{n}": torch.randn(model.spec.prefix_shape(n), generator=g) for n in lengths}


def collect(outputs) -> tuple[list[int], list[torch.Tensor], str]:
    tokens = [t for o in outputs for t in o.token_ids]
    logits = [lg for o in outputs for lg in o.logits]
    return tokens, logits, "".join(o.text for o in outputs)


def kv_for(model, p: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(model.spec.prefix_shape(p), generator=torch.Generator().manual_seed(seed))


def make_ntk(model: LoadedModel, seed: int) -> NtkPrefix:
    """Values of the size a trained state has: the NTK term is comparable to attention's own."""
    s = model.spec
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(s.n_layer, s.n_head, s.head_dim, s.head_dim, generator=g) * 0.3  # [L, H, D, D]
    k = torch.rand(s.n_layer, s.n_head, s.head_dim, generator=g) * 0.2  # [L, H, D]
    return NtkPrefix(z, k)


# ---- HTTP ----------------------------------------------------------------------------------------
# ---- over live HTTP --------------------------------------------------------------------------------
def sse_events(lines) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
    return events


def start_server(
    model_dir, tmp_path, quiet: bool = False, ready_s: float = 90, **env_over
) -> tuple[subprocess.Popen, str]:
    """`prefixserve serve` as a subprocess on a free port, once ready: auth off unless `env_over` says
    otherwise (a None value unsets a variable). `quiet`: its output discarded (else kept in a pipe, read
    when it fails to start)."""
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
    env = {k: v for k, v in env.items() if v is not None}  # None: leave the variable unset
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefixserve.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL if quiet else subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_s
    while True:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            said = "" if quiet else proc.stdout.read().decode(errors="replace")
            raise RuntimeError("server did not start:\n" + said)
        time.sleep(0.1)


# ---- training ------------------------------------------------------------------------------------
TRAIN = {"epochs": 1, "prefix_len": 2, "hidden": 8, "batch_size": 4}


def train_body(n: int = 8, **hyper) -> dict:
    examples = [{"input": x, "output": y} for x, y in table_to_text(n)]
    return {"train": {"examples": examples, **TRAIN, **hyper}}


# ---- jobs ------------------------------------------------------------------------------------------
def submit(service: PrefixService, queue, pairs, config: TrainConfig, tenant: str = "alice") -> Job:
    job = Job(
        id=f"job-{random.getrandbits(48):012x}", tenant=tenant, config=config.to_dict(), n_examples=len(pairs)
    )
    data = "\n".join(json.dumps({"input": x, "output": y}) for x, y in pairs).encode()
    service.store.put_training_data(job.id, data)
    queue.submit(job)
    return job
