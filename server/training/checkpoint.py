"""A training job's per-epoch checkpoint as bytes, without pickle (invariant 7).

One safetensors file: the prefix encoder's tensors under `encoder.<name>`, the optimizer's per-parameter
state tensors under `optimizer.<param>.<name>`, and everything else (format, the job's training config,
epochs done, progress, optimizer param groups and scalar state, the LR schedule) as JSON in the
header's `__metadata__`. The worker stores it in the durable store after every epoch
(`DurableStore.put_checkpoint`, atomic replace) and a reclaimed job resumes from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .trainer import Progress, TrainState

FORMAT = "prefixserve-checkpoint/1"


class CheckpointMismatch(Exception):
    """The bytes are not a checkpoint of this job's configuration (wrong format, other config, damaged)."""


def encode_checkpoint(state: TrainState, config: dict) -> bytes:
    """`config`: the job's TrainConfig as a dict; a checkpoint only resumes the same configuration."""
    tensors = {f"encoder.{k}": _cpu(v) for k, v in state.encoder.items()}
    scalars: dict[str, dict[str, object]] = {}
    for param, entries in state.optimizer["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{param}.{name}"] = _cpu(value)
            else:
                scalars.setdefault(str(param), {})[name] = value
    meta = {
        "format": FORMAT,
        "config": config,
        "epochs_done": state.epochs_done,
        "progress": asdict(state.progress),
        "param_groups": state.optimizer["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": state.scheduler,
    }
    return st_save(tensors, metadata={"prefixserve": json.dumps(meta)})


def decode_checkpoint(data: bytes, config: dict) -> TrainState:
    """The state to resume; CheckpointMismatch if the bytes are not a checkpoint of `config`."""
    try:
        tensors = st_load(data)
        meta = json.loads(_header_metadata(data)["prefixserve"])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointMismatch(f"unreadable checkpoint: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointMismatch(f"expected format {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("config") != json.loads(json.dumps(config)):
        raise CheckpointMismatch("the checkpoint was made with another training config")
    encoder = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
    opt_state: dict[int, dict[str, object]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param, name = key.split(".", 2)
            opt_state.setdefault(int(param), {})[name] = value
    for param, entries in meta["optimizer_scalars"].items():
        opt_state.setdefault(int(param), {}).update(entries)
    return TrainState(
        epochs_done=int(meta["epochs_done"]),
        progress=Progress(**meta["progress"]),
        encoder=encoder,
        optimizer={"state": opt_state, "param_groups": meta["param_groups"]},
        scheduler=meta["scheduler"],
    )


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors header (the format: 8-byte little-endian length, JSON)."""
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError(f"header length {n} does not fit the {len(data)} bytes")
    return json.loads(data[8 : 8 + n])["__metadata__"]
