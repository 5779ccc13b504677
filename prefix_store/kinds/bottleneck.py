"""Kind `adapter`: bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), and AdaMix
(Wang et al. 2022) once its M adapters are averaged into one. At a site a sublayer's output h (after
attention's output projection: "attn"; after the MLP: "mlp") becomes `h + gelu(h down + db) up + ub`
for the rows carrying one, before the residual addition. Houlsby: both sites; Pfeiffer: "mlp" only.

File: per site `adapter.<site>.down` `[n_layer, C, m]`, `.down_bias` `[n_layer, m]`, `.up` `[n_layer, m, C]`,
`.up_bias` `[n_layer, C]`; m (the bottleneck) is the adapter's own, 1 <= m <= 4C.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidPrefixFile
from ..limits import KIND_ADAPTER
from ..spec import ModelSpec
from ..staging import StepInputs
from ..state import ADAPTER_SITES, BottleneckAdapter
from .base import StackCache
from .weights import WeightPlan, check_abs, check_shape, finite, plan_groups, stacked

if TYPE_CHECKING:
    from ..bounds import Expect, MagnitudeBounds

PARTS = ("down", "down_bias", "up", "up_bias")


def tensor_names(sites) -> list[str]:
    return sorted(f"adapter.{site}.{part}" for site in sites for part in PARTS)


def bottleneck(h: torch.Tensor, down, down_bias, up, up_bias) -> torch.Tensor:
    """The adapter's delta for h `[..., C]`: gelu(h down + db) up + ub (the reference form; the trainer's)."""
    return F.gelu(h @ down + down_bias) @ up + up_bias


class BottleneckKind:
    name: ClassVar[str] = KIND_ADAPTER
    positional: ClassVar[bool] = False
    weight_side: ClassVar[bool] = True
    placed: ClassVar[bool] = False
    sites: ClassVar[tuple[str, ...]] = ADAPTER_SITES
    tensor_sets: ClassVar[tuple[list[str], ...]] = (tensor_names(["mlp"]), tensor_names(ADAPTER_SITES))
    state_type: ClassVar[type] = BottleneckAdapter  # what a loaded prefix of this kind is (kind_of)

    def __init__(self) -> None:
        self._stacks = StackCache()

    # ---- format and validation -------------------------------------------------------------------
    @staticmethod
    def check_shapes(shapes: dict[str, list[int]], prefix_len: int, expect: Expect) -> None:
        spec = expect.spec
        n_layer, c = spec.n_layer, spec.n_embd
        for site in sorted({n.split(".")[1] for n in shapes}):
            down = shapes[f"adapter.{site}.down"]
            m = down[2] if len(down) == 3 else -1
            if not 1 <= m <= 4 * c:
                raise InvalidPrefixFile(
                    f"adapter.{site}.down must be [{n_layer}, {c}, m] with 1 <= m <= {4 * c}, got {down}"
                )
            want = {
                "down": [n_layer, c, m],
                "down_bias": [n_layer, m],
                "up": [n_layer, m, c],
                "up_bias": [n_layer, c],
            }
            for part, shape in want.items():
                check_shape(f"adapter.{site}.{part}", shapes[f"adapter.{site}.{part}"], shape)

    @staticmethod
    def check_magnitudes(arrays: dict[str, np.ndarray], bounds: MagnitudeBounds) -> None:
        check_abs(arrays)

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> BottleneckAdapter:
        sites = sorted({n.split(".")[1] for n in tensors})
        return BottleneckAdapter({s: tuple(tensors[f"adapter.{s}.{p}"] for p in PARTS) for s in sites})

    @staticmethod
    def to_tensors(state: BottleneckAdapter) -> dict[str, torch.Tensor]:
        return {
            f"adapter.{s}.{p}": t for s, ts in state.sites.items() for p, t in zip(PARTS, ts, strict=True)
        }

    @staticmethod
    def check(state: BottleneckAdapter, spec: ModelSpec, max_len: int) -> str | None:
        if set(state.sites) not in ({"mlp"}, set(ADAPTER_SITES)):
            houlsby = list(ADAPTER_SITES)
            return (
                f"adapter sites must be ['mlp'] (Pfeiffer) or {houlsby} (Houlsby), got {sorted(state.sites)}"
            )
        n_layer, c = spec.n_layer, spec.n_embd
        for site, (down, db, up, ub) in state.sites.items():
            m = down.shape[-1]
            shapes = [list(t.shape) for t in (down, db, up, ub)]
            if shapes != [[n_layer, c, m], [n_layer, m], [n_layer, m, c], [n_layer, c]]:
                want = f"[{n_layer}, {c}, m], [{n_layer}, m], [{n_layer}, m, {c}], [{n_layer}, {c}]"
                return f"adapter {site} tensors must be {want} for this model, got {shapes}"
            if not all(t.is_floating_point() for t in (down, db, up, ub)) or not finite((down, db, up, ub)):
                return f"adapter {site} must be finite floating point values"
        return None

    @staticmethod
    def length(state: BottleneckAdapter) -> int:
        return 0

    @staticmethod
    def nbytes(state: BottleneckAdapter) -> int:
        return state.nbytes

    @staticmethod
    def to(state: BottleneckAdapter, device: torch.device, dtype: torch.dtype) -> BottleneckAdapter:
        return state.to(device, dtype)

    # ---- the step ---------------------------------------------------------------------------------
    def idle(self) -> None:
        self._stacks.clear()

    def plan(
        self, members: dict[int, list[int]], states: dict[int, BottleneckAdapter], inputs: StepInputs
    ) -> WeightPlan:
        return plan_groups(members, states, inputs, self._stacks, _stack)

    @staticmethod
    def apply(site: str, layer: int, inp: torch.Tensor, out: torch.Tensor, plan: WeightPlan) -> None:
        """out `[N, C]` += the adapter's delta of inp `[N, C]` (the sublayer's output; often out itself)
        for the planned tokens whose adapter sits here."""
        if plan.groups is not None and (ts := plan.stacks.get(site)) is not None:
            down, db, up, ub = (t[layer] for t in ts)  # [G, C, m], [G, m], [G, m, C], [G, C]
            mid = F.gelu(torch.baddbmm(db.unsqueeze(1), plan.gather(inp), down))  # [G, Tmax, m]
            plan.scatter(out, torch.baddbmm(ub.unsqueeze(1), mid, up))  # [G, Tmax, C]
        for toks, state in plan.singles:
            if (ts := state.sites.get(site)) is not None:
                out.index_add_(0, toks, bottleneck(inp[toks], *(t[layer] for t in ts)))


def _stack(states: list[BottleneckAdapter]) -> dict[str, tuple[torch.Tensor, ...]]:
    """-> site: (down `[L, G, C, mmax]`, db `[L, G, mmax]`, up `[L, G, mmax, C]`, ub `[L, G, C]`), zero
    where an adapter has no such site or a smaller bottleneck (gelu(0) = 0: nothing is added)."""
    out = {}
    for site in ADAPTER_SITES:
        parts = [s.sites.get(site) for s in states]
        present = [p for p in parts if p is not None]
        if not present:
            continue
        down0 = present[0][0]
        m, c = max(p[0].shape[-1] for p in present), down0.shape[1]
        shapes = ((c, m), (m,), (m, c), (c,))
        out[site] = tuple(stacked([p and p[i] for p in parts], shapes[i], down0) for i in range(4))
    return out
