"""Prefix tuning as in Li & Liang (2021), with the MLP reparameterisation of their released code.

The LM is frozen. Trainable: `P' [P, n_embd]` (an embedding of the P virtual tokens) and the MLP
`Linear(n_embd, k) -> tanh -> Linear(k, n_layer*2*n_embd)`; the prefix is `P = MLP(P')`, laid out as
PEFT lays out `prompt_embeddings` (so PEFT's `PrefixTuningConfig(prefix_projection=True,
encoder_hidden_size=k)` is an exact reference). A training sequence is z = [x; sep; y; eos] with the
loss on y and eos only. Positions of z follow the prefix (P .. P+T-1), as at serving time. After
training the MLP is discarded and only P (canonical `[n_layer, 2, n_head, P, head_dim]`) is kept.

`kind="ntk"` trains an NTK-Attention prefix instead (prefix_store/kinds/ntk.py): per layer and head a
`Z [D, D]` (or `Z_a [D, s] Z_b [s, D]` with `ntk_rank` s) and `k [D]`, through the same attention
formula the server computes (`ntk_combine`), on the same data and job API. k is kept positive
(k = softplus(k')), as it is in the paper's derivation (a sum of positive features), so the
attention denominator stays positive. Init: Z = 0 (Z_b = 0), k ~ 0, i.e. the bare model.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from prefix_store.importers import peft_to_canonical
from prefix_store.kinds.lora import ALL_MODULES
from prefix_store.kinds.ntk import ntk_combine
from prefix_store.limits import KIND_PREFIX_KV
from prefix_store.spec import ModelSpec
from prefixserve.families import spec_from_config
from prefixserve.model import hf_cache_kwargs

from .adapters import ADAPTER_SITE_SETS, IGNORE, BottleneckEncoder, LoraEncoder, lm_loss


@dataclass(frozen=True)
class TrainConfig:
    """Defaults from the paper's table-to-text setting (prefix length 10, 10 epochs, batch 5, lr 5e-5)."""

    prefix_len: int = 10
    hidden: int = 512  # k: 512 in the paper's released code (800 for summarisation)
    epochs: int = 10
    batch_size: int = 5
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_length: int = 512  # tokens of x + sep + y + eos
    grad_clip: float = 1.0
    val_fraction: float = 0.0  # held out for an eval loss per epoch
    seed: int = 42
    separator: str = "\n"  # between x and y; appended to the input at serving time
    kind: str = KIND_PREFIX_KV  # one of TRAIN_KINDS (prefix_len and hidden apply to prefix_kv only)
    ntk_rank: int = 0  # ntk: rank s of Z = Z_a Z_b; 0 = a full Z [D, D]
    lora_rank: int = 8  # lora: r
    lora_alpha: float = 16.0  # lora: the update is scaled by lora_alpha / r
    lora_modules: tuple[str, ...] = ("attn.c_attn",)  # lora: any of LORA_MODULES (PEFT's GPT-2 default)
    adapter_size: int = 64  # adapter, adamix: the bottleneck m
    adapter_sites: str = "houlsby"  # adapter, adamix: "houlsby" (attn + mlp) or "pfeiffer" (mlp)
    adamix_experts: int = 4  # adamix: M down and M up projections per layer and site
    adamix_consistency: float = 1.0  # adamix: weight of the symmetric KL between the two routed passes

    def __post_init__(self) -> None:
        if self.kind not in TRAIN_KINDS:
            raise ValueError(f"kind must be one of {list(TRAIN_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "lora_modules", tuple(self.lora_modules))  # (a JSON list from a job record)
        if not self.lora_modules or not set(self.lora_modules) <= set(ALL_MODULES):
            raise ValueError(f"lora_modules must be a non-empty subset of {list(ALL_MODULES)}")
        if self.adapter_sites not in ADAPTER_SITE_SETS:
            raise ValueError(
                f"adapter_sites must be one of {list(ADAPTER_SITE_SETS)}, got {self.adapter_sites!r}"
            )

    @property
    def positions(self) -> int:
        """Positions the trained prefix occupies (an NTK prefix occupies none)."""
        return self.prefix_len if self.kind == KIND_PREFIX_KV else 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Progress:
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    eta_s: float | None = None
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    eval_losses: list[float] = field(default_factory=list)  # one per epoch, if validating

    def copy(self) -> Progress:
        """A copy that shares no list with this one."""
        return replace(self, losses=list(self.losses), eval_losses=list(self.eval_losses))


@dataclass
class TrainState:
    """Everything needed to resume training at an epoch boundary (server/training/checkpoint.py
    stores it without pickle: safetensors for the tensors, JSON for the rest)."""

    epochs_done: int
    progress: Progress
    encoder: dict[str, torch.Tensor]  # the prefix encoder's state_dict (P' and the MLP, or NTK state)
    optimizer: dict  # AdamW state_dict
    scheduler: dict  # the LR schedule's state_dict


class Cancelled(Exception):
    """Raised from the progress callback to stop training: the job was cancelled."""


class Interrupted(Exception):
    """Raised from the progress callback to stop training: the worker is shutting down."""


class PrefixEncoder(nn.Module):
    """P' and the MLP; `forward()` returns PEFT-layout prompt embeddings `[P, n_layer*2*W]`, W the width
    of one layer's keys (n_kv_head * head_dim: n_embd for GPT-2; less with grouped-query attention, where
    PEFT sizes P' and the MLP by it too)."""

    def __init__(self, prefix_len: int, width: int, hidden: int, n_layer: int, n_kv_head: int) -> None:
        super().__init__()
        self.prefix_len, self.n_layer, self.n_head = prefix_len, n_layer, n_kv_head
        self.embedding = nn.Embedding(prefix_len, width)
        self.transform = nn.Sequential(
            nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, n_layer * 2 * width)
        )
        self.register_buffer("tokens", torch.arange(prefix_len), persistent=False)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding(self.tokens))  # [P, L*2*C]

    def loss(
        self,
        model: GPT2LMHeadModel,
        ids: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        step: int | None,
    ) -> torch.Tensor:
        """The prefix as every layer's past keys and values (positions 0..P-1), ids after it."""
        b, p = ids.shape[0], self.prefix_len
        kv = self().view(p, self.n_layer * 2, self.n_head, -1).permute(1, 2, 0, 3)  # [L*2, Hkv, P, D]
        layers = [
            (kv[2 * i].expand(b, -1, -1, -1), kv[2 * i + 1].expand(b, -1, -1, -1))
            for i in range(self.n_layer)
        ]
        full_mask = torch.cat([torch.ones(b, p, dtype=mask.dtype, device=mask.device), mask], dim=1)
        return lm_loss(model, ids, labels, full_mask, **hf_cache_kwargs(model, layers))

    @torch.no_grad()
    def tensors(self) -> dict[str, torch.Tensor]:
        """The canonical prefix `past_key_values [L, 2, H, P, D]` (the MLP is not needed any more)."""
        return {"past_key_values": peft_to_canonical(self().float().cpu(), self.n_layer, self.n_head)}


class NtkEncoder(nn.Module):
    """An NTK-Attention prefix's trainable state; `forward()` returns (z `[L, H, D, D]`, k `[L, H, D]`)."""

    def __init__(self, n_layer: int, n_head: int, head_dim: int, rank: int) -> None:
        super().__init__()
        lh = (n_layer, n_head)
        if rank:
            self.z_a = nn.Parameter(torch.randn(*lh, head_dim, rank) * head_dim**-0.5)
            self.z_b = nn.Parameter(torch.zeros(*lh, rank, head_dim))
        else:
            self.z = nn.Parameter(torch.zeros(*lh, head_dim, head_dim))
        self.k_raw = nn.Parameter(torch.full((*lh, head_dim), -4.0))  # k = softplus(k_raw) ~ 0.018
        self.rank = rank

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.z_a @ self.z_b if self.rank else self.z
        return z, F.softplus(self.k_raw)

    def loss(
        self,
        model: GPT2LMHeadModel,
        ids: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        step: int | None,
    ) -> torch.Tensor:
        return ntk_lm_loss(model, ids, labels, mask, *self())

    @torch.no_grad()
    def tensors(self) -> dict[str, torch.Tensor]:
        """What the store keeps (format.TENSOR_SETS["ntk"])."""
        k = F.softplus(self.k_raw).float().cpu()
        if self.rank:
            return {"ntk_k": k, "ntk_z_a": self.z_a.float().cpu(), "ntk_z_b": self.z_b.float().cpu()}
        return {"ntk_k": k, "ntk_z": self.z.float().cpu()}


def ntk_lm_loss(
    model: GPT2LMHeadModel,
    ids: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    z: torch.Tensor,
    k: torch.Tensor,
) -> torch.Tensor:
    """GPT-2 forward on HF's own modules with NTK-Attention in every layer; ids, labels, mask `[B, T]`
    (right-padded), z `[L, H, D, D]`, k `[L, H, D]`. Returns the mean loss over labelled tokens."""
    tr, cfg = model.transformer, model.config
    b, t = ids.shape
    c, h = cfg.n_embd, cfg.n_head
    d = c // h
    x = tr.wte(ids) + tr.wpe(torch.arange(t, device=ids.device))  # [B, T, C]; no prefix positions
    keep = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril() & mask.bool()[:, None, None, :]
    for layer, block in enumerate(tr.h):
        q, key, v = (
            s.view(b, t, h, d).transpose(1, 2) for s in block.attn.c_attn(block.ln_1(x)).split(c, dim=-1)
        )  # [B, H, T, D] each
        scores = (q @ key.transpose(-1, -2) / d**0.5).masked_fill(~keep, float("-inf"))  # [B, H, T, T]
        lse = torch.logsumexp(scores, -1)  # [B, H, T]
        o = torch.softmax(scores, -1) @ v  # [B, H, T, D]
        a = ntk_combine(_tokens(o), _tokens(lse), _tokens(q), z[layer], k[layer])  # [B*T, H, D]
        x = x + block.attn.c_proj(a.reshape(b, t, c))
        x = x + block.mlp(block.ln_2(x))
    logits = model.lm_head(tr.ln_f(x))  # [B, T, V]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


def _tokens(a: torch.Tensor) -> torch.Tensor:
    """`[B, H, T, ...]` -> `[B*T, H, ...]`."""
    return a.transpose(1, 2).flatten(0, 1)


def validation_split(n: int, cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """Indices of the training and the held-out examples: a shuffle seeded by `cfg.seed`, the first
    `val_fraction` of it held out (the same split every time, for the job's evaluation too)."""
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    n_val = int(n * cfg.val_fraction)
    return order[n_val:], order[:n_val]


def encode_example(
    tok: PreTrainedTokenizerBase, x: str, y: str, separator: str
) -> tuple[list[int], list[int]]:
    """Token ids of z = [x; sep; y; eos] and labels (IGNORE on x and sep)."""
    head = tok.encode(x + separator, add_special_tokens=False)
    tail = [*tok.encode(y, add_special_tokens=False), tok.eos_token_id]
    return head + tail, [IGNORE] * len(head) + tail


@torch.no_grad()
def bare_model_loss(
    model: GPT2LMHeadModel, tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], separator: str
) -> float:
    """The frozen model's loss on the same labelled tokens with no prefix: the baseline to beat."""
    total, count = 0.0, 0
    for x, y in pairs:
        ids, labels = encode_example(tok, x, y, separator)
        n = sum(1 for t in labels[1:] if t != IGNORE)
        total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
        count += n
    return total / count


def _batches(examples: list[tuple[list[int], list[int]]], size: int, pad: int, device):
    for i in range(0, len(examples), size):
        chunk = examples[i : i + size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (x, y) in enumerate(chunk):
            ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = (
                torch.tensor(x),
                torch.tensor(y),
                1,
            )
        yield ids.to(device), labels.to(device), mask.to(device)


class PrefixTrainer:
    def __init__(
        self, model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerBase, config: TrainConfig
    ) -> None:
        self.model = model.eval().requires_grad_(False)  # frozen; dropout off
        self.tok = tokenizer
        self.config = config
        self.spec = spec_from_config(model.config)
        self.device = next(model.parameters()).device
        torch.manual_seed(config.seed)
        self.encoder: nn.Module = _encoder(config, self.spec).to(self.device)

    def loss(
        self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, step: int | None = None
    ) -> torch.Tensor:
        """Mean loss over the labelled tokens of a batch `[B, T]` with the current prefix or adapter.
        `step`: the optimizer step being trained (AdaMix routes by it); None: evaluation."""
        return self.encoder.loss(self.model, ids, labels, mask, step)

    def train(
        self,
        pairs: list[tuple[str, str]],
        on_progress: Callable[[Progress], None] | None = None,
        resume: TrainState | None = None,
        on_epoch: Callable[[TrainState], None] | None = None,
    ) -> tuple[dict[str, torch.Tensor], Progress]:
        """Train on (input, output) pairs; returns the prefix's tensors (`tensors()`) and the record.

        `on_epoch` gets the state after every epoch but the last; `resume` continues from such a state
        with the same result as an uninterrupted run (each epoch's order depends only on the seed and
        the epoch, and dropout is off)."""
        cfg = self.config
        data = [encode_example(self.tok, x, y, cfg.separator) for x, y in pairs]
        train_idx, val_idx = validation_split(len(data), cfg)
        val = [data[i] for i in val_idx]
        train = [data[i] for i in train_idx]
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        opt = torch.optim.AdamW(
            self.encoder.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        sched = get_linear_schedule_with_warmup(opt, cfg.warmup_steps, steps_per_epoch * cfg.epochs)
        prog = Progress(total_steps=steps_per_epoch * cfg.epochs)
        first_epoch = 0
        if resume is not None:
            first_epoch, prog = resume.epochs_done, self._restore(resume, opt, sched)
        pad = self.tok.eos_token_id
        start, start_step = time.monotonic(), prog.step
        for epoch in range(first_epoch, cfg.epochs):
            prog.epoch = epoch + 1
            epoch_order = train[:]
            random.Random(cfg.seed + epoch).shuffle(epoch_order)
            for ids, labels, mask in _batches(epoch_order, cfg.batch_size, pad, self.device):
                loss = self.loss(ids, labels, mask, prog.step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.encoder.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                prog.step += 1
                prog.loss = loss.item()
                prog.losses.append(prog.loss)
                elapsed = time.monotonic() - start
                prog.eta_s = elapsed / (prog.step - start_step) * (prog.total_steps - prog.step)
                if on_progress is not None:
                    on_progress(prog)
            if val:
                prog.eval_loss = self.evaluate_batches(val)
                prog.eval_losses.append(prog.eval_loss)
                if on_progress is not None:
                    on_progress(prog)
            if on_epoch is not None and epoch + 1 < cfg.epochs:
                on_epoch(self._snapshot(epoch + 1, prog, opt, sched))
        return self.tensors(), prog

    def _snapshot(self, epochs_done: int, prog: Progress, opt, sched) -> TrainState:
        return TrainState(
            epochs_done,
            prog.copy(),
            {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()},
            opt.state_dict(),
            sched.state_dict(),
        )

    def _restore(self, state: TrainState, opt, sched) -> Progress:
        self.encoder.load_state_dict(state.encoder)
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
        return state.progress.copy()

    @torch.no_grad()
    def evaluate_batches(self, data: list[tuple[list[int], list[int]]]) -> float:
        """Token-weighted mean loss over encoded examples."""
        total, count = 0.0, 0
        for ids, labels, mask in _batches(data, self.config.batch_size, self.tok.eos_token_id, self.device):
            n = int((labels[:, 1:] != IGNORE).sum())
            total += self.loss(ids, labels, mask).item() * n
            count += n
        return total / max(count, 1)

    def evaluate(self, pairs: list[tuple[str, str]]) -> float:
        return self.evaluate_batches(
            [encode_example(self.tok, x, y, self.config.separator) for x, y in pairs]
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the store keeps: the kind's file tensors (a prefix's canonical K/V, an NTK prefix's, LoRA's
        or a bottleneck adapter's; AdaMix: its experts averaged into one bottleneck adapter)."""
        return self.encoder.tensors()


# The trainable part of each kind a job may train (the two prefix kinds, LoRA, a bottleneck adapter, or
# AdaMix, stored as an adapter), built from the config and the model's spec: every one computes a batch's
# loss with itself attached to the frozen model (`loss`) and gives the store its file's tensors
# (`tensors`), so the trainer does not branch on the kind.
ENCODERS: dict[str, Callable[[TrainConfig, ModelSpec], nn.Module]] = {
    KIND_PREFIX_KV: lambda cfg, spec: PrefixEncoder(
        cfg.prefix_len, spec.kv_width, cfg.hidden, spec.n_layer, spec.n_kv_head
    ),
    "ntk": lambda cfg, spec: NtkEncoder(spec.n_layer, spec.n_head, spec.head_dim, cfg.ntk_rank),
    "lora": lambda cfg, spec: LoraEncoder(
        spec.n_layer, spec.lora_modules(), cfg.lora_rank, cfg.lora_alpha, list(cfg.lora_modules)
    ),
    "adapter": lambda cfg, spec: BottleneckEncoder(
        spec.n_layer, spec.n_embd, cfg.adapter_size, ADAPTER_SITE_SETS[cfg.adapter_sites]
    ),
    "adamix": lambda cfg, spec: BottleneckEncoder(
        spec.n_layer,
        spec.n_embd,
        cfg.adapter_size,
        ADAPTER_SITE_SETS[cfg.adapter_sites],
        cfg.adamix_experts,
        cfg.seed,
        cfg.adamix_consistency,
    ),
}
TRAIN_KINDS = tuple(ENCODERS)


def _encoder(cfg: TrainConfig, spec: ModelSpec) -> nn.Module:
    """The trainable part for the config's kind (everything else is the frozen model)."""
    if cfg.kind == "ntk" and spec.family != "gpt2":
        raise ValueError(f"NTK training runs on GPT-2 models; this is a {spec.family}-family model")
    if cfg.kind == "lora" and not set(cfg.lora_modules) <= set(spec.lora_modules()):
        raise ValueError(f"lora_modules must be a subset of this model's {list(spec.lora_modules())}")
    return ENCODERS[cfg.kind](cfg, spec)
