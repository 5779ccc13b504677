"""Loading the configured model (the API process, the engine process and the training worker alike)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from .model import LoadedModel, hub_model_available, load_model
from .settings import ServerSettings
from .tiny import write_tiny_model

log = logging.getLogger(__name__)


def load_configured_model(settings: ServerSettings) -> LoadedModel:
    """The configured model; "auto" is gpt2 from the hub (or its local cache), else the tiny model."""
    if settings.model == "auto":
        reason = None if hub_model_available("gpt2") else "the hub is unreachable and gpt2 is not cached"
        if reason is None:
            try:
                return load_model("gpt2", dtype=settings.dtype, device=settings.device)
            except OSError as exc:
                reason = str(exc).splitlines()[0]
        log.warning(
            "could not load gpt2 (%s); serving the OFFLINE TINY MODEL instead (random weights, for trying"
            " the API). Set PREFIXSERVE_MODEL to choose.",
            reason,
        )
        return load_configured_model(replace(settings, model="tiny"))
    name = settings.model
    if name == "tiny":
        path = Path(settings.data_dir) / "tiny-gpt2"
        if not (path / "config.json").exists():
            write_tiny_model(path)
        name = str(path)
    return load_model(name, dtype=settings.dtype, device=settings.device)
