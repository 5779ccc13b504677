"""The prefix kinds, registered here and nowhere else (format, validation, device layout, attention).

Adding a kind: a module with one class following `base.PrefixKind`, its name in `limits.KINDS`, and
its class in `KIND_CLASSES` below. Files, the device pool and the engine then know it. A kind attaches
at attention (`plan` + `attend`: prefix_kv, ntk) or, with `weight_side`, at the linear layers (`plan` +
`apply` at its `sites`: lora, adapter; weights.py).
"""

from __future__ import annotations

from typing import Any

from ..errors import PrefixServeError
from .base import PrefixKind
from .bottleneck import BottleneckKind
from .kv import KvPrefixKind
from .lora import LoraKind
from .ntk import NtkPrefixKind

KIND_CLASSES: tuple[type[PrefixKind], ...] = (KvPrefixKind, NtkPrefixKind, LoraKind, BottleneckKind)
BY_NAME: dict[str, type[PrefixKind]] = {cls.name: cls for cls in KIND_CLASSES}
TENSOR_SETS = {cls.name: cls.tensor_sets for cls in KIND_CLASSES}  # a file's tensors, per kind

__all__ = [
    "BY_NAME",
    "KIND_CLASSES",
    "TENSOR_SETS",
    "BottleneckKind",
    "KvPrefixKind",
    "LoraKind",
    "NtkPrefixKind",
    "PrefixKind",
    "kind_of",
    "kind_with_tensors",
]


def kind_with_tensors(names: list[str] | dict) -> type[PrefixKind] | None:
    """The kind whose files hold exactly these tensors, or None."""
    names = sorted(names)
    return next((cls for cls in KIND_CLASSES if names in cls.tensor_sets), None)


def kind_of(state: Any) -> type[PrefixKind]:
    """The kind of a loaded prefix state."""
    for cls in KIND_CLASSES:
        if cls.owns(state):
            return cls
    raise PrefixServeError(f"not a prefix state of any known kind: {type(state).__name__}")
