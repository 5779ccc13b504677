"""The prefix kinds, registered here and nowhere else (format, validation, device layout, attention).

Adding a kind: a module with one class following `base.PrefixKind` (its `name` a constant in
`limits.py`, its `state_type` in the `PrefixState` union of state.py) and its class in `KIND_CLASSES`
below. Files, the device pool and the engine then know it (`KINDS`, `WEIGHT_KINDS` and `kind_of`'s type
lookup follow from the classes). A kind attaches at attention (`plan` + `attend`:
prefix_kv, ntk) or, with `weight_side`, at the linear layers (`plan` + `apply` at its `sites`: lora,
adapter; weights.py).
"""

from __future__ import annotations

from typing import Any

from ..errors import PrefixServeError
from ..state import PrefixState
from .base import PrefixKind
from .bottleneck import BottleneckKind
from .kv import KvPrefixKind
from .lora import LoraKind
from .ntk import NtkPrefixKind

KIND_CLASSES: tuple[type[PrefixKind], ...] = (KvPrefixKind, NtkPrefixKind, LoraKind, BottleneckKind)
BY_NAME: dict[str, type[PrefixKind]] = {cls.name: cls for cls in KIND_CLASSES}
KINDS = tuple(BY_NAME)  # every kind's name, as files and the API spell it
WEIGHT_KINDS = tuple(cls.name for cls in KIND_CLASSES if cls.weight_side)  # at the linear layers
TENSOR_SETS = {cls.name: cls.tensor_sets for cls in KIND_CLASSES}  # a file's tensors, per kind
BY_STATE_TYPE: dict[type, type[PrefixKind]] = {cls.state_type: cls for cls in KIND_CLASSES}

__all__ = [
    "BY_NAME",
    "BY_STATE_TYPE",
    "KINDS",
    "KIND_CLASSES",
    "TENSOR_SETS",
    "WEIGHT_KINDS",
    "BottleneckKind",
    "KvPrefixKind",
    "LoraKind",
    "NtkPrefixKind",
    "PrefixKind",
    "kind_of",
    "kind_with_tensors",
    "prefix_length",
    "prefix_nbytes",
]


def kind_with_tensors(names: list[str] | dict) -> type[PrefixKind] | None:
    """The kind whose files hold exactly these tensors, or None."""
    names = sorted(names)
    return next((cls for cls in KIND_CLASSES if names in cls.tensor_sets), None)


def kind_of(state: Any) -> type[PrefixKind]:
    """The kind of a loaded prefix state: one lookup of its type (a subclass, such as a Parameter
    holding K/V, is found through its base)."""
    cls = BY_STATE_TYPE.get(type(state))
    if cls is None:
        cls = next((c for c in KIND_CLASSES if isinstance(state, c.state_type)), None)
    if cls is None:
        raise PrefixServeError(f"not a prefix state of any known kind: {type(state).__name__}")
    return cls


def prefix_length(state: PrefixState) -> int:
    """Positions the prefix occupies before a row's own tokens (its kind says; NTK: none)."""
    return kind_of(state).length(state)


def prefix_nbytes(state: PrefixState) -> int:
    """Bytes the prefix's tensors hold."""
    return kind_of(state).nbytes(state)
