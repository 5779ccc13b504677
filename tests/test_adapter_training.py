"""Training the weight-side kinds: LoRA matches PEFT's loss curve from the same init; bottleneck adapters
and AdaMix learn; what is trained is what the engine serves; jobs of every kind run through the worker."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2LMHeadModel

from prefix_store.kinds import BottleneckKind, LoraKind
from prefix_store.service import PrefixService, StoreConfig
from prefixserve.compile import bind_model
from prefixserve.engine import EngineConfig, EngineCore, SamplingParams
from prefixserve.training.jobs import JobStatus, LocalJobQueue, wait_for
from prefixserve.training.synthetic import table_to_text
from prefixserve.training.trainer import PrefixTrainer, TrainConfig, _batches, encode_example
from prefixserve.training.worker import Worker, WorkerConfig

from .helpers import submit
from .test_training import train_peft

MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def test_lora_loss_curve_and_weights_match_peft(tiny_model_dir, tiny_model):
    """Same model, data, order, initial A (B = 0, as PEFT), optimizer and schedule as PEFT's LoRA on all
    four modules (dropout off)."""
    tok = tiny_model.tokenizer
    pairs = table_to_text(12, seed=4)
    cfg = TrainConfig(
        kind="lora", lora_rank=4, lora_alpha=8, lora_modules=MODULES, epochs=2, batch_size=3,
        learning_rate=1e-2, warmup_steps=1, weight_decay=0.01,
    )  # fmt: skip
    ours = PrefixTrainer(GPT2LMHeadModel.from_pretrained(tiny_model_dir), tok, cfg)
    peft = get_peft_model(
        GPT2LMHeadModel.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0,
                   fan_in_fan_out=True, task_type="CAUSAL_LM"),
    )  # fmt: skip
    blocks = peft.base_model.model.transformer.h

    def peft_module(layer: int, name: str):
        part, leaf = name.split(".")
        return getattr(getattr(blocks[layer], part), leaf)

    with torch.no_grad():  # our initial A into PEFT's lora_A (both B are zero)
        for m in MODULES:
            for layer in range(tiny_model.spec.n_layer):
                peft_module(layer, m).lora_A["default"].weight.copy_(
                    ours.encoder.a[m.replace(".", "_")][layer].T
                )
    tensors, prog = ours.train(pairs)

    losses = train_peft(peft, tok, pairs, cfg)
    torch.testing.assert_close(torch.tensor(prog.losses), torch.tensor(losses), rtol=1e-5, atol=1e-5)
    assert prog.losses[-1] < prog.losses[0]
    for m in MODULES:
        layer = peft_module(1, m)
        torch.testing.assert_close(tensors[f"lora_a.{m}"][1], layer.lora_A["default"].weight.T.detach())
        torch.testing.assert_close(
            tensors[f"lora_b.{m}"][1], layer.lora_B["default"].weight.T.detach() * 2.0, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("lora", {"lora_modules": MODULES}),
        ("adapter", {"adapter_sites": "houlsby"}),
        ("adapter", {"adapter_sites": "pfeiffer", "adapter_size": 8}),
        ("adamix", {"adamix_experts": 3, "adapter_size": 16}),
    ],
)
def test_what_is_trained_is_what_the_engine_serves(tiny_model_dir, tiny_model, kind, extra):
    """The trainer's forward (hooks on HF GPT-2) and the engine's adapted rows give the same greedy
    tokens and logits with the trained (for AdaMix: averaged) adapter."""
    cfg = TrainConfig(kind=kind, epochs=2, batch_size=4, learning_rate=5e-3, **extra)
    trainer = PrefixTrainer(GPT2LMHeadModel.from_pretrained(tiny_model_dir), tiny_model.tokenizer, cfg)
    tensors, prog = trainer.train(table_to_text(16, seed=5))
    assert prog.losses[-1] < prog.losses[0], prog.losses
    state = (LoraKind if kind == "lora" else BottleneckKind).from_tensors(tensors)
    engine = EngineCore(tiny_model, EngineConfig(max_running=4, record_logits=True))
    engine.prefixes.register("trained", state)
    prompt = tiny_model.tokenizer.encode("name : Aromi | food : Italian\n")
    engine.add_request(prompt, SamplingParams(max_new_tokens=6), adapter_id="trained", request_id="r")
    outs = engine.run_to_completion()["r"]
    tokens, logits = [t for o in outs for t in o.token_ids], [lg for o in outs for lg in o.logits]
    seq = list(prompt)
    with torch.inference_mode(), trainer.encoder.attached(trainer.model):
        for step in range(6):
            ref = trainer.model(input_ids=torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(logits[step], ref, rtol=1e-4, atol=1e-4)
            seq.append(int(ref.argmax()))
    assert tokens == seq[len(prompt) :]


def test_adamix_routes_by_seed_and_step_and_averages_its_experts(tiny_model_dir, tiny_model):
    cfg = TrainConfig(kind="adamix", adamix_experts=4, adapter_size=8, epochs=1, batch_size=4)
    trainer = PrefixTrainer(GPT2LMHeadModel.from_pretrained(tiny_model_dir), tiny_model.tokenizer, cfg)
    enc = trainer.encoder
    routes = [enc.routes(cfg.seed, step) for step in range(40)]
    assert routes == [enc.routes(cfg.seed, step) for step in range(40)]  # a resumed job routes the same
    picks = {p for pair in routes for p in pair}
    assert len(picks) > 8 and all(0 <= i < 4 and 0 <= j < 4 for i, j in picks)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_()
    merged = enc.tensors()
    torch.testing.assert_close(merged["adapter.mlp.down"], enc.down["mlp"].mean(0))
    torch.testing.assert_close(merged["adapter.attn.up_bias"], enc.up_bias["attn"].mean(0))
    ids, labels, mask = next(_batches([encode_example(tiny_model.tokenizer, "a", "b", "\n")], 1, 0, "cpu"))
    routed, plain = trainer.loss(ids, labels, mask, step=3), trainer.loss(ids, labels, mask)
    assert torch.isfinite(routed) and torch.isfinite(plain) and routed.item() != plain.item()


@pytest.mark.parametrize("kind", ["lora", "adapter", "adamix"])
def test_jobs_of_every_adapter_kind_train_publish_and_serve(tiny_model, tmp_path, kind):
    service = PrefixService(bind_model(tiny_model), StoreConfig(url=str(tmp_path)))
    queue = LocalJobQueue()
    cfg = TrainConfig(kind=kind, epochs=1, batch_size=4, val_fraction=0.25, adapter_size=8)
    job = submit(service, queue, table_to_text(12), cfg)
    worker = Worker(queue, service, WorkerConfig(poll_s=0.05))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        done = wait_for(queue, job.id, 120)
    finally:
        stop.set()
        thread.join(30)
    try:
        assert done.status == JobStatus.SUCCEEDED, done.error
        meta = service.meta(done.prefix_id)
        assert meta.kind == ("lora" if kind == "lora" else "adapter") and meta.source == "train"
        assert (
            done.progress.eval_losses and "bleu" in done.evaluation["metrics"]
        )  # served by the worker's engine
    finally:
        service.close()
