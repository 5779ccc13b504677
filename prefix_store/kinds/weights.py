"""What the weight-side kinds (LoRA, bottleneck adapters) share: validation helpers and the step's
grouping, Punica's SGMV idea in plain batched matmuls.

Such a kind attaches at the linear layers, not at attention: per step `plan` groups the tokens by the
adapter they carry, then at each of its sites the engine calls `apply(site, layer, inp, out, plan)`,
which adds the adapter's delta to those tokens' rows of `out` (rows without one are untouched).
Adapters read by few tokens (decode rows) are stacked, padded to the largest rank, and run as one
batched matmul per site and layer whatever their number; an adapter read by many tokens (a prefill
chunk) gets a matmul of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..attention import QueryGroups
from ..errors import InvalidPrefixFile
from ..limits import ADAPTER_MAX_ABS
from ..staging import StepInputs
from .base import StackCache

# where a weight-side kind may attach, in a layer's order: a linear module's output (its input read), or a
# sublayer's output (attention's, the MLP's: read and added to). GPT-2's modules, then the Llama family's
# (PEFT's names); the two sublayers are every family's. A kind declares its own (`sites`); a family's
# forward calls `apply` at each of its own, and the engine checks at start-up that neither names another.
GPT2_SITES = ("attn.c_attn", "attn.c_proj", "attn", "mlp.c_fc", "mlp.c_proj", "mlp")
LLAMA_SITES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "attn",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp",
)  # fmt: skip
SITES = (*GPT2_SITES, *(s for s in LLAMA_SITES if s not in GPT2_SITES))
PAD_TOKENS = 8  # adapters read by at most this many tokens share one padded call ...
PAD_WASTE = 1.25  # ... and so do all of a step's adapters when padding adds at most 25% of their tokens


@dataclass
class WeightPlan:
    groups: QueryGroups | None  # the few-token adapters' tokens, grouped (one padded call per site)
    stacks: dict[str, tuple[torch.Tensor, ...]]  # site -> their tensors stacked `[L, G, ...]`
    singles: list[tuple[torch.Tensor, Any]]  # (token indices [Tg], adapter): a call each
    span: tuple[int, int] | None = None  # the grouped tokens are exactly these, group by group, unpadded

    def gather(self, inp: torch.Tensor) -> torch.Tensor:
        """The grouped tokens' rows of inp `[N, d]` -> `[G, Tmax, d]` (a view when they are one span)."""
        g = self.groups
        if self.span is not None:
            return inp[self.span[0] : self.span[1]].view(len(g.sizes), -1, inp.shape[-1])
        return inp[g.padded]

    def scatter(self, out: torch.Tensor, delta: torch.Tensor) -> None:
        """out `[N, d]` += each grouped token's row of delta `[G, Tmax, d]` (padding left out)."""
        g, flat = self.groups, delta.view(-1, delta.shape[-1])
        if self.span is not None:  # the engine orders decode rows by adapter: one slice
            out[self.span[0] : self.span[1]] += flat
        elif g.full:  # no padding: the rows are the tokens, in order
            out.index_add_(0, g.tokens, flat)
        else:
            out.index_add_(0, g.tokens, delta[g.valid])


def plan_groups(
    members: dict[int, list[int]],
    states: dict[int, Any],
    inputs: StepInputs,
    cache: StackCache,
    stack: Callable[[list[Any]], dict[str, tuple[torch.Tensor, ...]]],
) -> WeightPlan:
    sizes = [len(toks) for toks in members.values()]
    if len(sizes) * max(sizes) <= PAD_WASTE * sum(sizes):  # (e.g. equal prefill chunks)
        few = members
    else:
        few = {key: toks for key, toks in members.items() if len(toks) <= PAD_TOKENS}
    singles = [(inputs.put(toks), states[key]) for key, toks in members.items() if key not in few]
    if not few:
        cache.clear()
        return WeightPlan(None, {}, singles)
    few = cache.ordered(few, states)
    groups = QueryGroups.build(few, inputs)
    stacks = cache.get([states[key] for key in groups.keys], stack)
    return WeightPlan(groups, stacks, singles, _span(list(few.values())) if groups.full else None)


def _span(groups: list[list[int]]) -> tuple[int, int] | None:
    """(first, end) when the groups' tokens, in group order, are first, first + 1, ..., end - 1."""
    flat = [t for toks in groups for t in toks]
    return (flat[0], flat[0] + len(flat)) if flat == list(range(flat[0], flat[0] + len(flat))) else None


def check_abs(arrays: dict[str, np.ndarray]) -> None:
    """Every value within ADAPTER_MAX_ABS (trained adapters are far below it); names the worst tensor."""
    for name, array in sorted(arrays.items()):
        peak = float(np.abs(array).max()) if array.size else 0.0
        if not peak <= ADAPTER_MAX_ABS:  # (NaN fails too)
            raise InvalidPrefixFile(
                f"{name}: largest |value| is {peak:.4g}, above the bound of {ADAPTER_MAX_ABS:g} for adapter"
                " weights (a row whose numbers still overflow ends alone; see README, 'Magnitudes')"
            )


def check_shape(name: str, shape: list[int], want: list[int]) -> None:
    if shape != want:
        raise InvalidPrefixFile(f"{name} must have shape {want} for this model, got {shape}")


def stacked(parts: list[torch.Tensor | None], shape: tuple[int, ...], ref: torch.Tensor) -> torch.Tensor:
    """Per-adapter tensors `[L, ...]` (None: absent) -> `[L, G, *shape]`, each zero-padded at the end of
    every dim (a zero rank or bottleneck column adds exactly nothing)."""
    if all(t is not None and tuple(t.shape[1:]) == shape for t in parts):  # nothing to pad: one pass
        return torch.stack(parts, dim=1)  # type: ignore[arg-type]
    out = ref.new_zeros(ref.shape[0], len(parts), *shape)
    for g, t in enumerate(parts):
        if t is not None:
            out[(slice(None), g, *(slice(0, n) for n in t.shape[1:]))] = t
    return out


def finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)
