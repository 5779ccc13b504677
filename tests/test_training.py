"""Prefix tuning: learns, matches PEFT, and runs as durable jobs (in-process and Redis workers)."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup

from prefix_store.importers import peft_to_canonical
from prefix_store.service import PrefixService, StoreConfig
from prefixserve.compile import bind_model
from prefixserve.training.checkpoint import CheckpointMismatch, decode_checkpoint, encode_checkpoint
from prefixserve.training.jobs import (
    TERMINAL,
    Job,
    JobStatus,
    LocalJobQueue,
    RedisJobQueue,
    cancel,
    wait_for,
)
from prefixserve.training.synthetic import table_to_text
from prefixserve.training.trainer import PrefixTrainer, TrainConfig, _batches, bare_model_loss, encode_example
from prefixserve.training.worker import Worker, WorkerConfig

from .helpers import A, B, submit

FAST = TrainConfig(prefix_len=10, hidden=64, epochs=6, batch_size=8, learning_rate=5e-3, seed=0)


def test_prefix_lowers_held_out_loss_far_below_the_bare_model(tiny_model_dir, tiny_model):
    data = table_to_text(80)
    train, held = data[:60], data[60:]
    hf = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    trainer = PrefixTrainer(hf, tiny_model.tokenizer, FAST)
    tensors, prog = trainer.train(train)
    bare = bare_model_loss(hf, tiny_model.tokenizer, held, FAST.separator)
    trained = trainer.evaluate(held)
    assert trained < 0.6 * bare, (trained, bare)
    assert list(tensors["past_key_values"].shape) == list(tiny_model.spec.prefix_shape(10))
    assert prog.step == prog.total_steps == 6 * 8 and len(prog.losses) == prog.step
    assert sum(prog.losses[-5:]) < sum(prog.losses[:5])


def test_validation_split_reports_eval_loss_per_epoch(tiny_model_dir, tiny_model):
    cfg = TrainConfig(prefix_len=4, hidden=16, epochs=3, batch_size=8, learning_rate=5e-3, val_fraction=0.25)
    _, prog = PrefixTrainer(GPT2LMHeadModel.from_pretrained(tiny_model_dir), tiny_model.tokenizer, cfg).train(
        table_to_text(40)
    )
    assert len(prog.eval_losses) == 3 and prog.eval_losses[-1] < prog.eval_losses[0]
    assert prog.total_steps == 3 * 4  # 30 training examples, batches of 8


@pytest.mark.parametrize("kind", ["prefix_kv", "ntk", "lora", "adapter", "adamix"])
def test_resuming_from_an_epoch_checkpoint_gives_the_uninterrupted_result(tiny_model_dir, tiny_model, kind):
    """The per-epoch checkpoint (safetensors + JSON, no pickle) holds everything training depends on:
    encoder, AdamW moments, the LR schedule and the record, so a resumed run is the same run."""
    tok = tiny_model.tokenizer
    cfg = TrainConfig(
        prefix_len=4, hidden=16, epochs=3, batch_size=4, learning_rate=5e-3, warmup_steps=2, val_fraction=0.2
    )
    if kind == "ntk":
        cfg = TrainConfig(kind="ntk", ntk_rank=4, epochs=3, batch_size=4, learning_rate=0.3, val_fraction=0.2)
    if kind in ("lora", "adapter", "adamix"):  # (lora_modules as a JSON job record holds them: a list)
        more = {"lora_modules": ["attn.c_attn", "mlp.c_fc"], "adapter_size": 8, "adamix_experts": 3}
        cfg = TrainConfig(kind=kind, epochs=3, batch_size=4, learning_rate=5e-3, val_fraction=0.2, **more)
    pairs = table_to_text(20)

    def trainer() -> PrefixTrainer:
        return PrefixTrainer(GPT2LMHeadModel.from_pretrained(tiny_model_dir), tok, cfg)

    full, full_prog = trainer().train(pairs)
    saved: list[bytes] = []
    trainer().train(pairs, on_epoch=lambda state: saved.append(encode_checkpoint(state, cfg.to_dict())))
    assert len(saved) == 2  # after epochs 1 and 2 (the end of the last epoch is the result itself)
    state = decode_checkpoint(saved[0], cfg.to_dict())
    assert state.epochs_done == 1 and state.progress.step == 4 and len(state.progress.eval_losses) == 1
    resumed, prog = trainer().train(pairs, resume=state)
    for name, tensor in full.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)
    assert prog.step == full_prog.step and len(prog.losses) == len(full_prog.losses)
    losses, full_losses = torch.tensor(prog.losses), torch.tensor(full_prog.losses)
    torch.testing.assert_close(losses, full_losses, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointMismatch, match="another training config"):
        decode_checkpoint(saved[0], {**cfg.to_dict(), "epochs": 4})
    with pytest.raises(CheckpointMismatch, match="unreadable"):
        decode_checkpoint(saved[0][:100], cfg.to_dict())


def train_peft(peft, tok, pairs, cfg: TrainConfig) -> list[float]:
    """PEFT's model trained as the trainer trains (its data order, AdamW, linear schedule, clipping;
    dropout off) -> the loss of every step."""
    peft.eval()  # dropout off
    params = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    data = [encode_example(tok, x, y, cfg.separator) for x, y in pairs]
    order = list(range(len(data)))
    random.Random(cfg.seed).shuffle(order)  # the trainer's order: shuffled once, then per epoch
    train = [data[i] for i in order]
    sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, len(train) // cfg.batch_size * cfg.epochs)
    losses = []
    for epoch in range(cfg.epochs):
        epoch_order = train[:]
        random.Random(cfg.seed + epoch).shuffle(epoch_order)
        for ids, labels, mask in _batches(epoch_order, cfg.batch_size, tok.eos_token_id, "cpu"):
            loss = peft(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses


def peft_from(ours: PrefixTrainer, model) -> torch.nn.Module:
    """PEFT's prefix tuning with projection on `model`, sized as `ours` (a prefix_kv trainer) and
    starting from its encoder's initial weights (copied before `ours` trains)."""
    cfg = ours.config
    peft_cfg = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg.prefix_len, prefix_projection=True,
        encoder_hidden_size=cfg.hidden,
    )  # fmt: skip
    peft = get_peft_model(model, peft_cfg)
    encoder, init = peft.prompt_encoder["default"], ours.encoder.state_dict()
    with torch.no_grad():
        encoder.embedding.weight.copy_(init["embedding.weight"])
        for i in (0, 2):
            encoder.transform[i].weight.copy_(init[f"transform.{i}.weight"])
            encoder.transform[i].bias.copy_(init[f"transform.{i}.bias"])
    return peft


def test_loss_curve_and_prefix_match_peft(tiny_model_dir, tiny_model, tmp_path):
    """Same model, data, order, initial weights, hyperparameters (dropout off) as PEFT's
    PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=k)."""
    tok = tiny_model.tokenizer
    pairs = table_to_text(12, seed=3)
    cfg = TrainConfig(
        prefix_len=4, hidden=32, epochs=2, batch_size=3, learning_rate=1e-2, warmup_steps=1, weight_decay=0.01
    )
    ours = PrefixTrainer(GPT2LMHeadModel.from_pretrained(tiny_model_dir), tok, cfg)
    peft = peft_from(ours, GPT2LMHeadModel.from_pretrained(tiny_model_dir))
    tensors, prog = ours.train(pairs)

    losses = train_peft(peft, tok, pairs, cfg)
    torch.testing.assert_close(torch.tensor(prog.losses), torch.tensor(losses), rtol=1e-5, atol=1e-5)
    peft.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"]
    torch.testing.assert_close(
        tensors["past_key_values"],
        peft_to_canonical(saved.float(), tiny_model.spec.n_layer, tiny_model.spec.n_head),
        rtol=1e-5,
        atol=1e-5,
    )


def test_failing_job_ends_failed_after_max_attempts_and_rerun_publishes_once(tiny_model, tmp_path):
    service = PrefixService(bind_model(tiny_model), StoreConfig(url=str(tmp_path / "store")))
    queue = LocalJobQueue()
    worker = Worker(queue, service, WorkerConfig(max_attempts=3, poll_s=0.05))
    broken = submit(service, queue, table_to_text(4), FAST)
    os.remove(service.store.training_path(broken.id))  # its data vanished: every attempt fails
    while worker.run_once():
        pass
    job = queue.get(broken.id)
    assert job.status == JobStatus.FAILED and job.attempts == 3 and "PrefixNotFound" in job.error
    ok = submit(
        service, queue, table_to_text(10), TrainConfig(prefix_len=3, hidden=8, epochs=1, batch_size=5)
    )
    assert worker.run_once()
    first = queue.get(ok.id)
    assert first.status == JobStatus.SUCCEEDED and first.prefix_id == f"pfx-{ok.id}"
    first.status = JobStatus.QUEUED  # as if the worker died after publishing, before acking
    queue.submit(first)
    assert worker.run_once()
    again = queue.get(ok.id)
    assert again.status == JobStatus.SUCCEEDED and again.prefix_id == first.prefix_id
    assert [m.id for m in service.list("alice")] == [first.prefix_id]  # exactly one prefix
    service.close()


def test_cancel_queued_and_running_jobs(tiny_model, tmp_path):
    service = PrefixService(bind_model(tiny_model), StoreConfig(url=str(tmp_path / "store")))
    queue = LocalJobQueue()
    queued = submit(service, queue, table_to_text(4), FAST)
    assert cancel(queue, queued.id).status == JobStatus.CANCELLED
    long = submit(
        service, queue, table_to_text(200), TrainConfig(prefix_len=4, hidden=16, epochs=50, batch_size=4)
    )
    worker = Worker(queue, service, WorkerConfig(save_every_s=0.05, poll_s=0.05))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while queue.get(long.id).status != JobStatus.RUNNING or queue.get(long.id).progress.step == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cancel(queue, long.id)
        job = wait_for(queue, long.id, 30)
        assert job.status == JobStatus.CANCELLED and 0 < job.progress.step < job.progress.total_steps
        assert queue.get(queued.id).status == JobStatus.CANCELLED
        assert service.list("alice") == []
    finally:
        stop.set()
        thread.join(10)
        service.close()


NTK_FAST = {"kind": "ntk", "ntk_rank": 8, "epochs": 12, "batch_size": 8, "learning_rate": 0.5, "seed": 0}


@pytest.mark.parametrize("kind", ["prefix_kv", "ntk"])
def test_submit_wait_generate_through_the_http_api(live_server, kind):
    """The embedded default: no Redis, the server trains in-process. The same job API trains an
    NTK-Attention prefix when asked for `kind: ntk`."""
    server = live_server()
    pairs = table_to_text(60)
    hyper = (
        {
            k: v
            for k, v in FAST.to_dict().items()
            if k in ("prefix_len", "hidden", "epochs", "batch_size", "learning_rate", "seed")
        }
        if kind == "prefix_kv"
        else NTK_FAST
    )
    body = {"train": {"examples": [{"input": x, "output": y} for x, y in pairs], **hyper}, "name": "e2e"}
    r = httpx.post(server.url + "/prefixes", json=body, headers=A)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/jobs/{job_id}" and r.json()["status"] == "queued"
    assert r.json()["job_id"] == job_id
    assert httpx.get(server.url + f"/jobs/{job_id}", headers=B).status_code == 404  # another tenant's
    deadline = time.monotonic() + 60
    while (job := httpx.get(server.url + f"/jobs/{job_id}", headers=A).json())["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "succeeded", job
    steps = 48 if kind == "prefix_kv" else 96
    assert job["step"] == job["total_steps"] == steps and len(job["losses"]) == steps
    prefix = httpx.get(server.url + f"/prefixes/{job['prefix_id']}", headers=A).json()
    positions = 10 if kind == "prefix_kv" else 0
    assert prefix["source"] == "train" and prefix["owner"] == "alice" and prefix["kind"] == kind
    assert prefix["prefix_len"] == positions
    x = pairs[0][0]
    out = httpx.post(
        server.url + "/generate",
        headers=A,
        json={"prefix_id": job["prefix_id"], "input": x, "max_new_tokens": 12},
    ).json()
    assert out["usage"]["prefix_tokens"] == positions
    bare = httpx.post(server.url + "/generate", headers=A, json={"input": x, "max_new_tokens": 12}).json()
    assert out["text"] != bare["text"]
    assert " restaurant in " in out["text"]  # the trained template
    assert kind == "ntk" or " is a " in out["text"]  # (the NTK state learns it less completely)
    assert " restaurant in " not in bare["text"]


@pytest.mark.parametrize(
    ("train", "status", "needle"),
    [
        ({"examples": []}, 422, "examples"),
        ({"examples": [{"input": "a", "output": "  "}]}, 422, "examples[0].output: is empty"),
        (
            {"examples": [{"input": "ok", "output": "fine"}, {"input": "word " * 300, "output": "x"}]},
            422,
            "examples[1]: ",
        ),
        ({"examples": [{"input": "a", "output": "b"}], "epochs": 0}, 422, "epochs"),
        ({"examples": [{"input": "a", "output": "b"}], "kind": "ia3"}, 422, "kind"),
        (
            {"examples": [{"input": "a", "output": "b"}], "kind": "ntk", "ntk_rank": 17},
            422,
            "at most head_dim 16",
        ),
        ({"examples": [{"input": "a", "output": "b"}], "learning_rate": 5}, 422, "learning_rate"),
        (
            {"examples": [{"input": "a", "output": "b"}], "prefix_len": 100},
            422,
            "prefix_len: expected at most 64",
        ),
        ({"examples": [{"input": "a"}]}, 422, "output"),
        ({"examples": [{"input": "a", "output": "b"}], "bogus": 1}, 422, "bogus"),
    ],
)
def test_training_submissions_are_validated_when_submitted(api_for_training, train, status, needle):
    r = httpx.post(api_for_training.url + "/prefixes", json={"train": train}, headers=A)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_jsonl_upload_submits_a_job_and_bad_lines_are_named(api_for_training):
    lines = "\n".join(json.dumps({"input": x, "output": y}) for x, y in table_to_text(5)).encode()
    r = httpx.post(
        api_for_training.url + "/prefixes",
        headers=A,
        files={"train": ("d.jsonl", lines)},
        data={"hyperparameters": json.dumps({"epochs": 1, "prefix_len": 2, "hidden": 8})},
    )
    assert r.status_code == 202 and r.json()["config"]["epochs"] == 1 and r.json()["n_examples"] == 5
    bad = httpx.post(
        api_for_training.url + "/prefixes", headers=A, files={"train": ("d.jsonl", lines + b'\n{"input": 3}')}
    )
    assert bad.status_code == 422 and "train line 6" in bad.json()["error"]["message"]


@pytest.fixture(scope="module")
def api_for_training(module_live_server):
    return module_live_server()


# ---- a worker process killed with SIGKILL ---------------------------------------------------------
def start_worker(model_dir, store, redis_url) -> subprocess.Popen:
    env = {
        **os.environ,
        "PREFIXSERVE_MODEL": str(model_dir),
        "PREFIXSERVE_STORE_URL": str(store),
        "PREFIXSERVE_REDIS_URL": redis_url,
        "PREFIXSERVE_JOB_RECLAIM_S": "2",
        # progress saved at every chance: the test must see epoch 2 begin, however fast this machine trains
        "PREFIXSERVE_JOB_PROGRESS_S": "0",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "prefixserve.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_worker_killed_mid_job_resumes_from_its_checkpoint_and_publishes_exactly_once(
    tiny_model, tiny_model_dir, tmp_path, own_redis
):
    """SIGKILL a worker after its first epoch checkpoint: another worker reclaims the job, resumes it
    from that checkpoint as attempt 2 (progress never goes back without the attempt number going up),
    publishes one prefix, deletes the checkpoint, and removes the dead worker's consumer."""
    store = tmp_path / "store"
    service = PrefixService(bind_model(tiny_model), StoreConfig(url=str(store)))
    queue = RedisJobQueue(own_redis.url, reclaim_s=2)
    per_epoch = 25  # 100 examples, batch 4
    job = submit(
        service, queue, table_to_text(100), TrainConfig(prefix_len=4, hidden=16, epochs=4, batch_size=4)
    )
    first = start_worker(tiny_model_dir, store, own_redis.url)
    second = None
    seen: list[tuple[int, int]] = []  # (attempts, step) as a client polling the job sees them

    def observe() -> Job:
        j = queue.get(job.id)
        seen.append((j.attempts, j.progress.step))
        return j

    try:
        deadline = time.monotonic() + 120
        while (j := observe()).progress.epoch < 2 or j.progress.step < per_epoch + 3:
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.02)
        assert service.store.get_checkpoint(job.id) is not None  # epoch 1's
        before = j.progress.losses[:per_epoch]
        first.send_signal(signal.SIGKILL)  # dies mid-job, without acking
        first.wait()
        assert queue.get(job.id).status == JobStatus.RUNNING
        second = start_worker(tiny_model_dir, store, own_redis.url)
        deadline = time.monotonic() + 240
        while (done := observe()).status not in TERMINAL:
            assert time.monotonic() < deadline, done
            time.sleep(0.02)
        assert done.status == JobStatus.SUCCEEDED, done.error
        assert done.attempts == 2 and done.progress.step == done.progress.total_steps == 4 * per_epoch
        for (a0, s0), (a1, s1) in itertools.pairwise(seen):
            assert a1 >= a0 and (s1 >= s0 or a1 > a0), f"attempt {a0} step {s0} -> attempt {a1} step {s1}"
        assert min(s for a, s in seen if a == 2) >= per_epoch  # resumed after epoch 1, not from step 0
        assert done.progress.losses[:per_epoch] == before and len(done.progress.losses) == 4 * per_epoch
        assert [m.id for m in service.list("alice")] == [f"pfx-{job.id}"]
        assert service.meta(done.prefix_id).source == "train"
        deadline = time.monotonic() + 30  # the worker removes it right after saving the job's end
        while service.store.get_checkpoint(job.id) is not None:
            assert time.monotonic() < deadline, "the checkpoint outlived its job"
            time.sleep(0.02)
        deadline = time.monotonic() + 30  # the dead consumer: idle past 5 x reclaim_s, nothing pending
        while len(queue.consumers()) != 1:
            assert time.monotonic() < deadline, queue.consumers()
            time.sleep(0.2)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        service.close()


def test_cancel_a_running_job_over_http(api_for_training):
    url = api_for_training.url
    examples = [{"input": x, "output": y} for x, y in table_to_text(200)]
    r = httpx.post(
        url + "/prefixes",
        headers=A,
        json={"train": {"examples": examples, "epochs": 60, "prefix_len": 4, "hidden": 16, "batch_size": 4}},
    )
    job_id = r.json()["id"]
    deadline = time.monotonic() + 30
    while httpx.get(url + f"/jobs/{job_id}", headers=A).json()["step"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert httpx.delete(url + f"/jobs/{job_id}", headers=B).status_code == 404  # not bob's to cancel
    assert httpx.delete(url + f"/jobs/{job_id}", headers=A).status_code == 200
    while (job := httpx.get(url + f"/jobs/{job_id}", headers=A).json())["status"] == "running":
        assert time.monotonic() < deadline + 30
        time.sleep(0.05)
    assert job["status"] == "cancelled" and job["step"] < job["total_steps"] and job["prefix_id"] is None
