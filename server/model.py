"""Load a frozen checkpoint once and lay its weights out for serving.

The Hugging Face model is used only as a loader: its weights are copied into its family's weights
(families/: GPT-2, the Llama family), laid out for `addmm` (`[in, out]`) with the LM head as a
contiguous `[n_embd, vocab]` matrix, and the HF module is dropped.
"""

from __future__ import annotations

import hashlib
import inspect
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prefix_store.spec import ModelSpec

from .dense import QUANTIZE, Dense, Int8Dense, LayerDense, packing_available, quantization_available
from .errors import InvalidRequest
from .families import Forward, Weights, forward_of, spec_from_config, weights_from_hf
from .families.gpt2 import Gpt2Weights as GPT2Weights  # noqa: F401 (re-exported)
from .families.gpt2 import LayerWeights  # noqa: F401 (re-exported)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map 'float32' / 'bfloat16' / 'float16' (or fp32/bf16/fp16) to a torch dtype."""
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise InvalidRequest("dtype", f"expected one of float32, bfloat16, float16, got {name}")
    if name not in DTYPES:
        raise InvalidRequest("dtype", f"expected one of float32, bfloat16, float16, got {name!r}")
    return DTYPES[name]


def parse_device(name: str | torch.device) -> torch.device:
    """Accept 'cpu', 'cuda' or 'cuda:N'; fail clearly when CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise InvalidRequest("device", f"expected 'cpu' or 'cuda[:N]', got {str(name)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("device", "'cuda' was requested but torch sees no CUDA device")
    return device


def model_fingerprint(spec: ModelSpec, weights: Weights) -> str:
    """Architecture dims + sha256 of the frozen weights (architecture.md invariant 4).

    The weights are hashed rounded to bfloat16, so one checkpoint served in float32, bfloat16 or
    float16 has one fingerprint (a prefix made on any of them runs on the others).
    """
    h = hashlib.sha256()
    for t in weights.hashed():
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    dims = f"L{spec.n_layer}-H{spec.n_head}-C{spec.n_embd}-V{spec.vocab_size}-N{spec.n_positions}"
    if spec.family != "gpt2":  # (GPT-2's fingerprints predate families and stay as they were)
        s = spec
        dims = (
            f"L{s.n_layer}-H{s.n_head}-K{s.n_kv_head}-D{s.head_dim}-C{s.n_embd}-I{s.intermediate_size}"
            f"-V{s.vocab_size}-N{s.n_positions}"
        )
    return f"{spec.family}-{dims}-{h.hexdigest()[:32]}"


class Tokenized(Protocol):
    """What request and data checks read of a model: its dimensions and its tokenizer (a LoadedModel, or
    an API process's `compile.RemoteModel`, which has no weights)."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...


@dataclass
class LoadedModel:
    """One frozen model (any family in `families`), its tokenizer and its dimensions."""

    name: str
    spec: ModelSpec
    weights: Weights
    tokenizer: PreTrainedTokenizerBase
    dtype: torch.dtype
    device: torch.device
    eos_token_id: int | None  # generation stops here unless a request sets ignore_eos
    fingerprint: str  # dims + weight hash; every stored prefix is bound to it
    # the dense layers as the engine runs them, by (packing, quantization) asked for (made on first use)
    _dense: dict[tuple, tuple[list[LayerDense], Dense | Int8Dense]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def dense(
        self, pack: bool = True, quantize: str | None = None
    ) -> tuple[list[LayerDense], Dense | Int8Dense]:
        """Each layer's dense layers and the LM head, laid out for serving (dense.py): packed for
        oneDNN as well when `pack` and this device runs the dtype natively; int8 GEMMs throughout with
        `quantize="int8"` (a serving option: the weights, and so the fingerprint, stay the model's).
        Made once, on first use, so only the process that runs the model pays for the extra copies."""
        if quantize not in (None, *QUANTIZE):
            raise InvalidRequest("quantize", f"expected one of {list(QUANTIZE)} or none, got {quantize!r}")
        if quantize and not quantization_available(self.device, self.dtype):
            raise InvalidRequest(
                "quantize", f"int8 runs float32 models on an x86 CPU; this is {self.dtype} on {self.device}"
            )
        pack = pack and not quantize and packing_available(self.device, self.dtype)
        key = (pack, quantize)
        if key not in self._dense:
            self._dense[key] = _dense_layers(self.weights, pack, quantize)
        return self._dense[key]

    def forward(self, pack: bool = True, quantize: str | None = None) -> Forward:
        """The family's computation around attention over `dense(pack, quantize)` (engine/runner.py)."""
        return forward_of(self.spec, self.weights, *self.dense(pack, quantize))

    @property
    def served_name(self) -> str:
        """The name clients see (`/ready`, `/v1/models`): a hub id as given, a local directory's name."""
        return Path(self.name).name if Path(self.name).exists() else self.name


def _dense_layers(w: Weights, pack: bool, quantize: str | None) -> tuple[list[LayerDense], Dense | Int8Dense]:
    """Every dense layer of the model, and its LM head, in one layout (dense.py)."""

    def layer(weight: torch.Tensor, bias: torch.Tensor | None, head: bool = False) -> Dense | Int8Dense:
        if quantize:
            return Int8Dense(weight, bias)
        return Dense.of(weight, bias, pack, keep_plain=not head)

    return w.dense_layers(layer), layer(w.lm_head, None, head=True)


def load_hf_model(name_or_path: str | Path, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The checkpoint as a frozen HF module in eval mode (used by loaders, references and baselines)."""
    config = AutoConfig.from_pretrained(str(name_or_path))
    spec_from_config(config)  # reject unsupported checkpoints before loading weights
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return model


def hf_cache_kwargs(
    hf: PreTrainedModel, layers: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, DynamicCache]:
    """Per-layer (key, value) `[B, Hkv, P, D]` pairs as the keyword that hands an HF model a KV cache.

    transformers 5.2x renamed `past_key_values=` to `cache=` (the old name is deprecated and goes in
    5.40); this picks the name the installed release's `forward` declares, for `forward` and `generate`.
    """
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    return {key: DynamicCache(ddp_cache_data=layers)}


def hub_model_available(repo_id: str, timeout_s: float = 3.0, endpoint: str | None = None) -> bool:
    """Whether `repo_id` can be loaded now: it is in the local HF cache, or the hub answers within
    `timeout_s` (one HEAD request; any HTTP answer counts). Offline this takes one failed connection
    instead of the hub client's retries (~20 s), and with HF_HUB_OFFLINE set no network at all."""
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return True
    if hf_constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(
            urllib.request.Request(endpoint or hf_constants.ENDPOINT, method="HEAD"), timeout=timeout_s
        )
    except urllib.error.HTTPError:
        return True  # the hub answered
    except (OSError, ValueError):
        return False  # no route, no name, refused, timed out
    return True


def load_model(
    name_or_path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu"
) -> LoadedModel:
    """Load a supported checkpoint (GPT-2, or the Llama family; hub id or local directory) once, frozen."""
    torch_dtype = parse_dtype(dtype)
    torch_device = parse_device(device)
    hf = load_hf_model(name_or_path, torch_dtype, torch_device)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    spec = spec_from_config(hf.config)
    weights = weights_from_hf(spec, hf)
    return LoadedModel(
        name=str(name_or_path),
        spec=spec,
        weights=weights,
        tokenizer=tokenizer,
        dtype=torch_dtype,
        device=torch_device,
        eos_token_id=tokenizer.eos_token_id,
        fingerprint=model_fingerprint(spec, weights),
    )
