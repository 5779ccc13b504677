"""Kind `prefix_kv`: per-layer key/value tensors (Li & Liang 2021), `past_key_values`
`[n_layer, 2, n_head, P, head_dim]` (architecture.md invariant 1), stored once on the device.

Attention (Hydragen): the query tokens of every row that shares a prefix are stacked and attend to
its K/V in one matmul per layer, so a popular prefix is read once per step whatever the number of rows.
Distinct short prefixes (at most `PAD_LIMIT` positions, read by at most `PAD_TOKENS` queries: decode rows)
are padded into one batched call instead of one call each; their stack is rebuilt only when the set of
prefixes in the step changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..attention import Partial, QueryGroups, attention_lse
from ..errors import InvalidPrefixFile
from ..limits import KIND_PREFIX_KV
from ..spec import ModelSpec
from ..staging import StepInputs
from ..state import KvPrefix
from .base import StackCache, check_peaks

if TYPE_CHECKING:
    from ..bounds import Expect, MagnitudeBounds

TENSOR_NAME = "past_key_values"
PAD_LIMIT = 64  # prefixes up to this long share one padded call; longer ones get a call each
PAD_TOKENS = 8  # ... when at most this many query tokens attend to each (decode rows): queries are
# padded to the largest group, so a prefill chunk goes alone rather than pad every group to its length


@dataclass
class _Stack:
    kv: torch.Tensor  # [G, L, 2, H, Pmax, D] the padded prefixes
    bias: torch.Tensor  # [G, 1, 1, Pmax] 0 where a prefix has a position, -inf in its padding


@dataclass
class _Plan:
    padded: QueryGroups | None  # the short prefixes' groups, one batched call
    stack: _Stack | None
    singles: list[tuple[torch.Tensor, torch.Tensor]]  # (token indices [Tg], K/V [L, 2, H, P, D])


class KvPrefixKind:
    name: ClassVar[str] = KIND_PREFIX_KV
    positional: ClassVar[bool] = True  # its prefix occupies positions before the row's tokens
    weight_side: ClassVar[bool] = False  # attaches at attention
    placed: ClassVar[bool] = True  # resident in a run of the engine's KV blocks (unified paging)
    tensor_sets: ClassVar[tuple[list[str], ...]] = ([TENSOR_NAME],)
    state_type: ClassVar[type] = KvPrefix  # what a loaded prefix of this kind is (kind_of)

    def __init__(self) -> None:
        self._stacks = StackCache()

    # ---- format and validation -------------------------------------------------------------------
    @staticmethod
    def check_shapes(shapes: dict[str, list[int]], prefix_len: int, expect: Expect) -> None:
        shape = shapes[TENSOR_NAME]
        if len(shape) != 5:
            raise InvalidPrefixFile(f"shape must be [n_layer, 2, n_head, P, head_dim] (5 dims), got {shape}")
        p = shape[3]
        want = list(expect.spec.prefix_shape(p))
        if shape != want:
            raise InvalidPrefixFile(f"shape must be {want} for this model, got {shape}")
        if not 1 <= p <= expect.max_prefix_len:
            raise InvalidPrefixFile(
                f"prefix length must be in [1, {expect.max_prefix_len}], got {p} (the limit is"
                " max_prefix_len, or less where the model's context must still hold one input token and"
                " one new token)"
            )
        if p != prefix_len:
            raise InvalidPrefixFile(
                f"metadata prefix_len {prefix_len} does not match the tensor's length {p}"
            )

    @staticmethod
    def check_magnitudes(arrays: dict[str, np.ndarray], bounds: MagnitudeBounds) -> None:
        peaks = np.abs(arrays[TENSOR_NAME].reshape(len(bounds.key), 2, -1)).max(-1)  # [L, 2]
        check_peaks(f"{TENSOR_NAME} keys", peaks[:, 0], bounds.key)
        check_peaks(f"{TENSOR_NAME} values", peaks[:, 1], bounds.value)

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> KvPrefix:
        return KvPrefix(tensors[TENSOR_NAME])

    @staticmethod
    def check(prefix: KvPrefix, spec: ModelSpec, max_len: int) -> str | None:
        state = prefix.kv  # [L, 2, H, P, D]
        if state.dim() != 5:
            return f"prefix must have 5 dims [n_layer, 2, n_head, P, head_dim], got shape {list(state.shape)}"
        expected = spec.prefix_shape(state.shape[3])
        if tuple(state.shape) != expected:
            return f"prefix shape must be {list(expected)} for this model, got {list(state.shape)}"
        if not 1 <= state.shape[3] <= max_len:
            return f"prefix length must be in [1, {max_len}], got {state.shape[3]}"
        if not state.is_floating_point():
            return f"prefix dtype must be floating point, got {state.dtype}"
        if not bool(torch.isfinite(state).all()):
            return "prefix contains NaN or Inf values"
        return None

    @staticmethod
    def length(state: KvPrefix) -> int:
        return state.kv.shape[3]

    @staticmethod
    def nbytes(state: KvPrefix) -> int:
        return state.kv.numel() * state.kv.element_size()

    @staticmethod
    def to(state: KvPrefix, device: torch.device, dtype: torch.dtype) -> KvPrefix:
        return KvPrefix(state.kv.detach().to(device=device, dtype=dtype).contiguous())  # [L, 2, H, P, D]

    # ---- attention -------------------------------------------------------------------------------
    def idle(self) -> None:
        self._stacks.clear()

    def plan(self, members: dict[int, list[int]], states: dict[int, KvPrefix], inputs: StepInputs) -> _Plan:
        short = {
            key: toks
            for key, toks in members.items()
            if states[key].length <= PAD_LIMIT and len(toks) <= PAD_TOKENS
        }
        if len(short) < 2:  # one call per prefix is as good as a batch of one
            short = {}
        singles = [(inputs.put(toks), states[key].kv) for key, toks in members.items() if key not in short]
        if not short:
            self._stacks.clear()
            return _Plan(None, None, singles)
        groups = QueryGroups.build(self._stacks.ordered(short, states), inputs)
        stack = self._stacks.get([states[key] for key in groups.keys], _stack)
        return _Plan(groups, stack, singles)

    def attend(self, layer: int, q: torch.Tensor, plan: _Plan, scale: float) -> tuple[torch.Tensor, Partial]:
        tokens: list[torch.Tensor] = []
        parts: list[Partial] = []
        if plan.padded is not None:
            g, kv = plan.padded, plan.stack.kv[:, layer]  # kv [G, 2, H, Pmax, D]
            out, lse = attention_lse(
                g.gather(q), kv[:, 0], kv[:, 1], plan.stack.bias, scale
            )  # [G, H, Tmax, D]
            tokens.append(g.tokens)
            parts.append(Partial.softmax(g.unpad(out), g.unpad(lse)))
        for toks, state in plan.singles:  # Hydragen: every query of the prefix's rows in one matmul
            qs = q[toks].transpose(0, 1).unsqueeze(0)  # [1, H, Tg, D]
            k, v = state[layer, 0].unsqueeze(0), state[layer, 1].unsqueeze(0)  # [1, H, P, D]
            out, lse = attention_lse(qs, k, v, None, scale)  # [1, H, Tg, D], [1, H, Tg]
            tokens.append(toks)
            parts.append(Partial.softmax(out[0].transpose(0, 1), lse[0].transpose(0, 1)))
        return torch.cat(tokens) if len(tokens) > 1 else tokens[0], Partial.cat(parts)

    def fuses(self, device: torch.device) -> bool:
        return False  # (its rows' prefix part is merged with their own keys' by the engine)

    def fused_decode(self, *args: object) -> torch.Tensor:
        raise NotImplementedError("prefix_kv has no fused decode: its part is merged (fuses() is False)")


def _stack(prefixes: list[KvPrefix]) -> _Stack:
    """Pad prefixes of different lengths into one tensor.
    -> kv `[G, L, 2, H, Pmax, D]`, bias `[G, 1, 1, Pmax]`."""
    states = [p.kv for p in prefixes]  # [L, 2, H, P, D] each
    lengths = [s.shape[3] for s in states]
    top, first = max(lengths), states[0]
    kv = first.new_zeros(len(states), *first.shape[:3], top, first.shape[4])
    bias = first.new_zeros(len(states), 1, 1, top)
    for i, (s, n) in enumerate(zip(states, lengths, strict=True)):
        kv[i, :, :, :, :n] = s
        bias[i, ..., n:] = float("-inf")
    return _Stack(kv, bias)
