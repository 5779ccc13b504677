"""What a prefix kind is: one class that knows its file format, its validation, its device layout and
its part of attention. The registry (`kinds/__init__.py`) lists the kinds; nothing else branches on them.

A kind's attention runs in two phases per step: `plan` once (the step's rows grouped by the prefix
they attend to, stacked prefix tensors built or reused), then `attend` per layer, which returns the
`Partial` (attention.py) of every query token that has a prefix of this kind. The engine merges it with
the same tokens' partial over their own keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

from ..attention import Partial
from ..errors import InvalidPrefixFile
from ..spec import ModelSpec
from ..staging import StepInputs

if TYPE_CHECKING:  # format.py imports the kinds; these are its types
    from ..bounds import Expect, MagnitudeBounds


class PrefixKind(Protocol):
    name: ClassVar[str]  # the `kind` in a file's metadata
    positional: ClassVar[bool]  # its prefix occupies positions 0..P-1 before a row's own tokens
    weight_side: ClassVar[bool]  # attaches at the linear layers (`apply`), not at attention (`attend`)
    # its device state is per-token K/V `[L, 2, H, P, D]` that may live in the engine's paged KV pool
    placed: ClassVar[bool]
    tensor_sets: ClassVar[tuple[list[str], ...]]  # the tensors (sorted names) a file of this kind holds
    state_type: ClassVar[type]  # what a loaded prefix of this kind is: `kind_of` looks its type up

    # ---- format and validation (class-level: the store uses them without an engine) -------------
    @staticmethod
    def check_shapes(shapes: dict[str, list[int]], prefix_len: int, expect: Expect) -> None:
        """Raise InvalidPrefixFile unless a file's tensor shapes fit the model (and its metadata)."""
        ...

    @staticmethod
    def check_magnitudes(arrays: dict[str, np.ndarray], bounds: MagnitudeBounds) -> None:
        """Raise InvalidPrefixFile unless every layer's values are within `bounds` (float32 arrays)."""
        ...

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> Any:
        """The state the engine serves, built from a checked file's tensors."""
        ...

    @staticmethod
    def check(state: Any, spec: ModelSpec, max_len: int) -> str | None:
        """What is wrong with a state for this model (shape, dtype, finite values), or None."""
        ...

    @staticmethod
    def length(state: Any) -> int:
        """Positions the prefix occupies before a row's own tokens."""
        ...

    @staticmethod
    def nbytes(state: Any) -> int: ...

    @staticmethod
    def to(state: Any, device: torch.device, dtype: torch.dtype) -> Any:
        """The device layout: the state as the engine reads it."""
        ...

    # ---- attention (an instance per engine: it may keep the last step's stacked tensors) ---------
    def idle(self) -> None:
        """A step without rows of this kind: let go of anything kept from earlier steps."""
        ...

    def plan(self, members: dict[int, list[int]], states: dict[int, Any], inputs: StepInputs) -> Any:
        """Once per step. `members`: prefix (by identity) -> the step's token indices attending to it;
        `states`: the same keys -> the resident states. Index tensors are staged in `inputs` (one
        upload per step; their device values arrive before `attend` runs)."""
        ...

    def attend(self, layer: int, q: torch.Tensor, plan: Any, scale: float) -> tuple[torch.Tensor, Partial]:
        """Per layer: q `[N, H, D]` (every token of the step) -> the planned tokens' indices `[T]` and
        their partial state over the prefix."""
        ...

    def fuses(self, device: torch.device) -> bool:
        """Whether, on this device, a decode step whose every row has a prefix of this kind runs each
        layer's whole attention (own keys and prefix together) in `fused_decode`: one kernel."""
        ...

    def fused_decode(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lens: torch.Tensor,
        plan: Any,
        scale: float,
    ) -> torch.Tensor:
        """That fused attention: q `[B, H, D]` (one token per row), each row's own keys and values k/v
        `[B, H, S, D]` (gathered), lens `[B]` int32 -> `[B, H, D]`."""
        ...


def check_peaks(what: str, peaks: np.ndarray, limits: tuple[float, ...]) -> None:
    """peaks, limits `[L]`: the largest |value| and the bound per layer; names the worst layer."""
    ratio = peaks / np.asarray(limits)  # [L]; NaN (an overflowed product) counts as over
    if not bool(np.all(ratio <= 1.0)):
        layer = int(np.argmax(np.where(np.isnan(ratio), np.inf, ratio)))
        raise InvalidPrefixFile(
            f"{what}: largest |value| at layer {layer} is {peaks[layer]:.4g}, above this model's bound of"
            f" {limits[layer]:.4g} (prefix magnitudes are bounded so that attention cannot overflow in"
            " float16, bfloat16 or float32; see README, 'Magnitudes')"
        )


class StackCache:
    """The last step's stacked prefix tensors, reused while the same prefixes are stacked in the same
    order (a steady decode batch rebuilds nothing). Keeps the states it was built from, so identity
    comparison is sound."""

    def __init__(self) -> None:
        self._states: list[Any] = []
        self._value: Any = None

    def clear(self) -> None:
        """Let go of the stack (a step without stacked prefixes): no copy outlives its use."""
        self._states, self._value = [], None

    def ordered(self, members: dict[int, list[int]], states: dict[int, Any]) -> dict[int, list[int]]:
        """`members` in the order of the kept stack when they hold the same states (rows move around in
        a step's order as requests come and go; the stack need not be rebuilt for that)."""
        rank = {id(s): i for i, s in enumerate(self._states)}
        if len(members) != len(rank) or not all(id(states[key]) in rank for key in members):
            return members
        return dict(sorted(members.items(), key=lambda item: rank[id(states[item[0]])]))

    def get(self, states: list[Any], build) -> Any:
        same = len(states) == len(self._states) and all(
            a is b for a, b in zip(states, self._states, strict=True)
        )
        if not same:
            self._value, self._states = build(states), list(states)
        return self._value
