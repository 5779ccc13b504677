"""Loading the configured model (the API process, the engine process and the training worker alike)."""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

from transformers import AutoTokenizer, GPT2Config, PreTrainedTokenizerBase

from .model import LoadedModel, ModelSpec, hub_model_available, load_model, spec_from_config
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
    return load_model(_local_name(settings.model, settings), dtype=settings.dtype, device=settings.device)


def configured_spec(settings: ServerSettings) -> ModelSpec:
    """The configured model's dimensions from its config alone (no weights loaded)."""
    return spec_from_config(GPT2Config.from_pretrained(_configured_path(settings)))


def configured_tokenizer_and_spec(settings: ServerSettings) -> tuple[PreTrainedTokenizerBase, ModelSpec]:
    """The configured model's tokenizer and dimensions (no weights loaded): what an API process without
    the model prepares requests with. ("auto" is resolved once: at most one look at the hub.)"""
    path = _configured_path(settings)
    return AutoTokenizer.from_pretrained(path), spec_from_config(GPT2Config.from_pretrained(path))


def _configured_path(settings: ServerSettings) -> str:
    name = settings.model
    if name == "auto":
        name = "gpt2" if hub_model_available("gpt2") else "tiny"
    return _local_name(name, settings)


def _local_name(name: str, settings: ServerSettings) -> str:
    """A model name as `load_model` takes it: "tiny" is the offline tiny model, written on first use."""
    if name != "tiny":
        return name
    path = Path(settings.data_dir) / "tiny-gpt2"
    if not (path / "config.json").exists():  # written whole, then renamed: processes starting together
        tmp = path.with_name(f".tmp-tiny-{uuid.uuid4().hex}")  # never read a half-written one
        write_tiny_model(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process was first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
