"""Kind `lora`: LoRA (Hu et al. 2021) on any subset of GPT-2's `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`
and `mlp.c_proj`, or of the Llama family's `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`
(`ModelSpec.lora_modules`), a rank per adapter (and per module). Served per row in mixed batches: at a
module the rows carrying adapters gain `x a b` (weights.py groups them), rows without one are untouched.

File: per adapted module `lora_a.<module>` `[n_layer, in, r]` and `lora_b.<module>` `[n_layer, r, out]`,
with lora_alpha / r folded into `lora_b` (PEFT adapters are converted so on import, importers.py).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..errors import InvalidPrefixFile
from ..limits import KIND_LORA
from ..spec import ModelSpec
from ..staging import StepInputs
from ..state import LLAMA_LORA_MODULES, LORA_MODULES, LoraAdapter
from .base import StackCache
from .weights import WeightPlan, check_abs, check_shape, finite, plan_groups, stacked

if TYPE_CHECKING:
    from ..bounds import Expect, MagnitudeBounds

MAX_RANK = 256
ALL_MODULES = (*LORA_MODULES, *LLAMA_LORA_MODULES)  # every family's, GPT-2's first


def tensor_names(modules) -> list[str]:
    return sorted(f"lora_{ab}.{m}" for m in modules for ab in "ab")


def module_dims(module: str, spec: ModelSpec) -> tuple[int, int]:
    """A module's (in, out) widths; InvalidPrefixFile when the model has no such module."""
    dims = spec.lora_modules()
    if module not in dims:
        raise InvalidPrefixFile(f"LoRA module {module!r} is not one of this model's {list(dims)}")
    return dims[module]


class LoraKind:
    name: ClassVar[str] = KIND_LORA
    positional: ClassVar[bool] = False
    weight_side: ClassVar[bool] = True
    placed: ClassVar[bool] = False
    sites: ClassVar[tuple[str, ...]] = ALL_MODULES
    tensor_sets: ClassVar[tuple[list[str], ...]] = tuple(
        tensor_names(ms)
        for family in (tuple(LORA_MODULES), LLAMA_LORA_MODULES)
        for n in range(1, len(family) + 1)
        for ms in itertools.combinations(family, n)
    )
    state_type: ClassVar[type] = LoraAdapter  # what a loaded prefix of this kind is (kind_of)

    def __init__(self) -> None:
        self._stacks = StackCache()

    # ---- format and validation -------------------------------------------------------------------
    @staticmethod
    def check_shapes(shapes: dict[str, list[int]], prefix_len: int, expect: Expect) -> None:
        spec = expect.spec
        for module in sorted({n.split(".", 1)[1] for n in shapes}):
            fin, fout = module_dims(module, spec)
            a = shapes[f"lora_a.{module}"]
            rank = a[2] if len(a) == 3 else -1
            top = min(MAX_RANK, fin, fout)
            if not 1 <= rank <= top:
                raise InvalidPrefixFile(
                    f"lora_a.{module} must be [{spec.n_layer}, {fin}, r] with 1 <= r <= {top}, got {a}"
                )
            check_shape(f"lora_a.{module}", a, [spec.n_layer, fin, rank])
            check_shape(f"lora_b.{module}", shapes[f"lora_b.{module}"], [spec.n_layer, rank, fout])

    @staticmethod
    def check_magnitudes(arrays: dict[str, np.ndarray], bounds: MagnitudeBounds) -> None:
        check_abs(arrays)

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> LoraAdapter:
        modules = sorted({n.split(".", 1)[1] for n in tensors})
        return LoraAdapter({m: (tensors[f"lora_a.{m}"], tensors[f"lora_b.{m}"]) for m in modules})

    @staticmethod
    def to_tensors(state: LoraAdapter) -> dict[str, torch.Tensor]:
        return {
            f"lora_{ab}.{m}": t for m, pair in state.modules.items() for ab, t in zip("ab", pair, strict=True)
        }

    @staticmethod
    def check(state: LoraAdapter, spec: ModelSpec, max_len: int) -> str | None:
        if not state.modules or not set(state.modules) <= set(spec.lora_modules()):
            allowed = list(spec.lora_modules())
            return f"LoRA modules must be a non-empty subset of {allowed}, got {sorted(state.modules)}"
        for module, (a, b) in state.modules.items():
            fin, fout = module_dims(module, spec)
            r = a.shape[-1]
            if list(a.shape) != [spec.n_layer, fin, r] or list(b.shape) != [spec.n_layer, r, fout]:
                return (
                    f"LoRA {module} must be a [{spec.n_layer}, {fin}, r] and b [{spec.n_layer}, r, {fout}],"
                    f" got {list(a.shape)} and {list(b.shape)}"
                )
            if not (a.is_floating_point() and b.is_floating_point()) or not finite((a, b)):
                return f"LoRA {module} must be finite floating point values"
        return None

    @staticmethod
    def length(state: LoraAdapter) -> int:
        return 0

    @staticmethod
    def nbytes(state: LoraAdapter) -> int:
        return state.nbytes

    @staticmethod
    def to(state: LoraAdapter, device: torch.device, dtype: torch.dtype) -> LoraAdapter:
        return state.to(device, dtype)

    # ---- the step ---------------------------------------------------------------------------------
    def idle(self) -> None:
        self._stacks.clear()

    def plan(
        self, members: dict[int, list[int]], states: dict[int, LoraAdapter], inputs: StepInputs
    ) -> WeightPlan:
        return plan_groups(members, states, inputs, self._stacks, _stack)

    @staticmethod
    def apply(site: str, layer: int, inp: torch.Tensor, out: torch.Tensor, plan: WeightPlan) -> None:
        """out `[N, out]` += inp `[N, in]` a b for the planned tokens whose adapter has this module."""
        if plan.groups is not None and (ab := plan.stacks.get(site)) is not None:
            a, b = ab  # [L, G, in, r], [L, G, r, out]
            plan.scatter(out, torch.bmm(torch.bmm(plan.gather(inp), a[layer]), b[layer]))  # [G, Tmax, out]
        for toks, state in plan.singles:
            if (pair := state.modules.get(site)) is not None:
                out.index_add_(0, toks, inp[toks] @ pair[0][layer] @ pair[1][layer])  # [Tg, out]


def _stack(states: list[LoraAdapter]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """-> module: (a `[L, G, in, rmax]`, b `[L, G, rmax, out]`), for the modules any of them adapts."""
    out = {}
    for module in ALL_MODULES:
        pairs = [s.modules.get(module) for s in states]
        present = [p for p in pairs if p is not None]
        if not present:
            continue
        a0, b0 = present[0]
        rank = max(a.shape[-1] for a, _ in present)
        a = stacked([p and p[0] for p in pairs], (a0.shape[1], rank), a0)
        b = stacked([p and p[1] for p in pairs], (rank, b0.shape[2]), b0)
        out[module] = (a, b)
    return out
