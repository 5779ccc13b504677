"""Trainable weight-side adapters on a frozen HF GPT-2: LoRA, bottleneck adapters and AdaMix.

Each encoder holds only the adapter's parameters and attaches to the frozen model with forward hooks for
the length of one forward pass (`attached`), adding its delta where the engine adds it at serving time
(prefix_store/kinds: lora.py at a linear module's output, bottleneck.py at a sublayer's output).
`loss(...)` is a batch's loss with the adapter attached; `tensors()` is what the store keeps: the served
kind's file tensors.

AdaMix (Wang et al. 2022, "AdaMix: Mixture-of-Adaptations"): M down- and M up-projections per layer
and site; each training step picks a random down and a random up projection (stochastic routing), runs
the batch twice with two such picks, and adds a symmetric KL consistency loss between the two passes'
token distributions to their mean LM loss. At the end the M projections are averaged into one
bottleneck adapter, which is what is evaluated, stored and served.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel, PreTrainedModel

from prefix_store.kinds.bottleneck import BottleneckKind, bottleneck
from prefix_store.state import BottleneckAdapter

ADAPTER_SITE_SETS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
IGNORE = -100  # the label of a token without loss (HF's ignore_index)


def lm_loss(
    model: GPT2LMHeadModel, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, **extra
) -> torch.Tensor:
    """The frozen model's mean loss over the labelled tokens of ids, labels, mask `[B, T]` (with whatever
    hooks are attached; `extra`: more of the forward's arguments, e.g. a prefix as past keys/values)."""
    return model(input_ids=ids, attention_mask=mask, labels=labels, **extra).loss


def _block(model: PreTrainedModel, layer: int) -> nn.Module:
    """Layer `layer` of GPT-2 (`transformer.h`) or of the Llama family (`model.layers`)."""
    return model.transformer.h[layer] if hasattr(model, "transformer") else model.model.layers[layer]


def _module(model: PreTrainedModel, layer: int, name: str) -> nn.Module:
    """`attn.c_attn`, `self_attn.q_proj` etc. of layer `layer`."""
    part, leaf = name.split(".")
    return getattr(getattr(_block(model, layer), part), leaf)


def _site(model: PreTrainedModel, layer: int, site: str) -> nn.Module:
    """A sublayer: attention (after its output projection) or the MLP."""
    block = _block(model, layer)
    if site == "mlp":
        return block.mlp
    return block.attn if hasattr(block, "attn") else block.self_attn


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _add_to_output(delta):
    """A forward hook adding delta(module input, module output) to the output (a tuple's first item)."""

    def hook(module, args, kwargs, out):
        inp = args[0] if args else kwargs.get("hidden_states")  # (Llama's sublayers take keywords)
        if isinstance(out, tuple):
            return (out[0] + delta(inp, out[0]), *out[1:])
        return out + delta(inp, out)

    return hook


class LoraEncoder(nn.Module):
    """LoRA on `modules`: per module a `[L, in, r]` (PEFT's init: Kaiming-uniform) and b `[L, r, out]`
    (zeros), delta = x a b * lora_alpha / r."""

    def __init__(
        self, n_layer: int, dims: dict[str, tuple[int, int]], rank: int, alpha: float, modules: list[str]
    ) -> None:
        """`dims`: the model's LoRA modules' (in, out) widths (ModelSpec.lora_modules)."""
        super().__init__()
        self.modules_, self.scaling, self.n_layer = list(modules), alpha / rank, n_layer
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        for m in self.modules_:
            fin, fout = dims[m]
            a = torch.empty(n_layer, fin, rank)
            for layer in range(n_layer):  # PEFT: kaiming_uniform_(A.weight [r, in], a=sqrt(5))
                w = torch.empty(rank, fin)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                a[layer] = w.T
            self.a[_key(m)] = nn.Parameter(a)
            self.b[_key(m)] = nn.Parameter(torch.zeros(n_layer, rank, fout))

    def loss(
        self,
        model: GPT2LMHeadModel,
        ids: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        step: int | None,
    ) -> torch.Tensor:
        with self.attached(model):
            return lm_loss(model, ids, labels, mask)

    def attached(self, model: GPT2LMHeadModel):
        handles = []
        for m in self.modules_:
            a, b = self.a[_key(m)], self.b[_key(m)]
            for layer in range(self.n_layer):
                delta = lambda x, out, a=a[layer], b=b[layer]: (x @ a) @ b * self.scaling  # noqa: E731
                handles.append(
                    _module(model, layer, m).register_forward_hook(_add_to_output(delta), with_kwargs=True)
                )
        return _hooks(handles)

    @torch.no_grad()
    def tensors(self) -> dict[str, torch.Tensor]:
        """The `lora` kind's tensors, lora_alpha / r folded into b."""
        out = {}
        for m in self.modules_:
            out[f"lora_a.{m}"] = self.a[_key(m)].float().cpu().clone()
            out[f"lora_b.{m}"] = (self.b[_key(m)] * self.scaling).float().cpu()
        return out


class BottleneckEncoder(nn.Module):
    """Bottleneck adapters at `sites`, with `experts` copies of every projection (1: a plain adapter;
    M > 1: AdaMix). down ~ N(0, 0.01) (near identity, as Houlsby), up and the biases zero."""

    def __init__(
        self,
        n_layer: int,
        n_embd: int,
        size: int,
        sites: tuple[str, ...],
        experts: int = 1,
        seed: int = 0,  # AdaMix: the routes' seed
        consistency: float = 1.0,  # AdaMix: the weight of the symmetric KL between the routed passes
    ) -> None:
        super().__init__()
        self.sites, self.n_layer, self.experts = sites, n_layer, experts
        self.seed, self.consistency = seed, consistency
        e, n, c, m = experts, n_layer, n_embd, size
        self.down = nn.ParameterDict({s: nn.Parameter(torch.randn(e, n, c, m) * 0.01) for s in sites})
        self.down_bias = nn.ParameterDict({s: nn.Parameter(torch.zeros(e, n, m)) for s in sites})
        self.up = nn.ParameterDict({s: nn.Parameter(torch.zeros(e, n, m, c)) for s in sites})
        self.up_bias = nn.ParameterDict({s: nn.Parameter(torch.zeros(e, n, c)) for s in sites})

    def loss(
        self,
        model: GPT2LMHeadModel,
        ids: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        step: int | None,
    ) -> torch.Tensor:
        """A plain adapter's loss; AdaMix while training (`step`): two randomly routed passes and their
        consistency; AdaMix evaluated (step None): its merged adapter's."""
        if self.experts == 1 or step is None:
            with self.attached(model):
                return lm_loss(model, ids, labels, mask)
        outs = []
        for pick in self.routes(self.seed, step):
            with self.attached(model, pick):
                outs.append(model(input_ids=ids, attention_mask=mask, labels=labels))
        consistency = symmetric_kl(outs[0].logits, outs[1].logits, labels, IGNORE)
        return (outs[0].loss + outs[1].loss) / 2 + self.consistency * consistency

    def attached(self, model: GPT2LMHeadModel, pick: tuple[int, int] | None = None):
        """Hooks for one forward pass: with `pick` (down expert, up expert) that routed pair, else the
        average of the experts (the merged adapter; a plain adapter has one)."""
        handles = []
        for s in self.sites:
            down, db, up, ub = self._weights(s, pick)
            for layer in range(self.n_layer):
                parts = (down[layer], db[layer], up[layer], ub[layer])
                delta = lambda x, out, parts=parts: bottleneck(out, *parts)  # noqa: E731
                handles.append(
                    _site(model, layer, s).register_forward_hook(_add_to_output(delta), with_kwargs=True)
                )
        return _hooks(handles)

    def _weights(self, site: str, pick: tuple[int, int] | None) -> tuple[torch.Tensor, ...]:
        if pick is None:
            return tuple(p[site].mean(0) for p in (self.down, self.down_bias, self.up, self.up_bias))
        i, j = pick  # AdaMix: the down projection (and its bias) of expert i, the up projection of j
        return self.down[site][i], self.down_bias[site][i], self.up[site][j], self.up_bias[site][j]

    def routes(self, seed: int, step: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The two random (down, up) picks of a training step (a function of seed and step alone, so a
        resumed job routes as an uninterrupted one)."""
        rng = random.Random(seed * 1_000_003 + step)
        return tuple((rng.randrange(self.experts), rng.randrange(self.experts)) for _ in range(2))  # type: ignore[return-value]

    @torch.no_grad()
    def tensors(self) -> dict[str, torch.Tensor]:
        """The `adapter` kind's tensors: the experts averaged into one bottleneck adapter."""
        merged = {s: tuple(t.float().cpu() for t in self._weights(s, None)) for s in self.sites}
        return BottleneckKind.to_tensors(BottleneckAdapter(merged))


def _key(module: str) -> str:
    return module.replace(".", "_")


def symmetric_kl(
    logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor, ignore: int
) -> torch.Tensor:
    """(KL(p_a || p_b) + KL(p_b || p_a)) / 2, averaged over the labelled next-token positions.
    logits `[B, T, V]`, labels `[B, T]`."""
    keep = labels[:, 1:] != ignore  # [B, T-1]
    la = F.log_softmax(logits_a[:, :-1][keep].float(), -1)  # [M, V]
    lb = F.log_softmax(logits_b[:, :-1][keep].float(), -1)
    kl_ab = F.kl_div(lb, la, log_target=True, reduction="batchmean")  # KL(p_a || p_b)
    kl_ba = F.kl_div(la, lb, log_target=True, reduction="batchmean")
    return (kl_ab + kl_ba) / 2
