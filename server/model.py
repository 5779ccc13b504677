"""Load a frozen GPT-2-family checkpoint once and lay its weights out for serving.

The Hugging Face model is used only as a loader: its weights are copied into `GPT2Weights`, laid out
for `addmm` (GPT-2's Conv1D already stores `[in, out]`) with the LM head as a contiguous
`[n_embd, vocab]` matrix, and the HF module is dropped.
"""

from __future__ import annotations

import hashlib
import inspect
import urllib.error
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
)

from prefix_store.spec import ModelSpec

from .dense import QUANTIZE, Dense, Int8Dense, LayerDense, packing_available, quantization_available
from .errors import InvalidRequest, UnsupportedModel

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu")


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


def spec_from_config(config: GPT2Config) -> ModelSpec:
    """The spec of a GPT-2-family checkpoint's config; UnsupportedModel for anything else."""
    if config.model_type != "gpt2":
        raise UnsupportedModel(
            f"expected a GPT-2-family checkpoint (model_type 'gpt2'), got {config.model_type!r}"
        )
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModel("GPT-2 checkpoints with cross-attention are not supported")
    if config.activation_function not in ACTIVATIONS:
        raise UnsupportedModel(
            f"activation {config.activation_function!r} is not supported; expected one of {ACTIVATIONS}"
        )
    if config.n_embd % config.n_head:
        raise UnsupportedModel(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
    return ModelSpec(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        n_positions=config.n_positions,
        vocab_size=config.vocab_size,
        layer_norm_eps=config.layer_norm_epsilon,
        activation=config.activation_function,
        scale_attn_weights=config.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
    )


@dataclass
class LayerWeights:
    ln1_w: torch.Tensor  # [C]
    ln1_b: torch.Tensor  # [C]
    attn_w: torch.Tensor  # [C, 3C]
    attn_b: torch.Tensor  # [3C]
    proj_w: torch.Tensor  # [C, C]
    proj_b: torch.Tensor  # [C]
    ln2_w: torch.Tensor  # [C]
    ln2_b: torch.Tensor  # [C]
    fc_w: torch.Tensor  # [C, 4C]
    fc_b: torch.Tensor  # [4C]
    out_w: torch.Tensor  # [4C, C]
    out_b: torch.Tensor  # [C]


@dataclass
class GPT2Weights:
    wte: torch.Tensor  # [V, C]
    wpe: torch.Tensor  # [n_positions, C]
    layers: list[LayerWeights]
    lnf_w: torch.Tensor  # [C]
    lnf_b: torch.Tensor  # [C]
    lm_head: torch.Tensor  # [C, V] contiguous (a transposed view of wte costs ~5%)

    @classmethod
    def from_hf(cls, model: GPT2LMHeadModel) -> GPT2Weights:
        t = model.transformer

        def w(p: torch.Tensor) -> torch.Tensor:
            return p.detach().contiguous()

        layers = [
            LayerWeights(
                ln1_w=w(b.ln_1.weight),
                ln1_b=w(b.ln_1.bias),
                attn_w=w(b.attn.c_attn.weight),
                attn_b=w(b.attn.c_attn.bias),
                proj_w=w(b.attn.c_proj.weight),
                proj_b=w(b.attn.c_proj.bias),
                ln2_w=w(b.ln_2.weight),
                ln2_b=w(b.ln_2.bias),
                fc_w=w(b.mlp.c_fc.weight),
                fc_b=w(b.mlp.c_fc.bias),
                out_w=w(b.mlp.c_proj.weight),
                out_b=w(b.mlp.c_proj.bias),
            )
            for b in t.h
        ]
        return cls(
            wte=w(t.wte.weight),
            wpe=w(t.wpe.weight),
            layers=layers,
            lnf_w=w(t.ln_f.weight),
            lnf_b=w(t.ln_f.bias),
            lm_head=model.lm_head.weight.detach().t().contiguous(),
        )


def model_fingerprint(spec: ModelSpec, weights: GPT2Weights) -> str:
    """Architecture dims + sha256 of the frozen weights (architecture.md invariant 4).

    The weights are hashed rounded to bfloat16, so one checkpoint served in float32, bfloat16 or
    float16 has one fingerprint (a prefix made on any of them runs on the others).
    """
    h = hashlib.sha256()
    tensors = [weights.wte, weights.wpe, weights.lnf_w, weights.lnf_b]
    for lw in weights.layers:
        tensors += [getattr(lw, f.name) for f in fields(lw)]
    for t in tensors:
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    dims = f"L{spec.n_layer}-H{spec.n_head}-C{spec.n_embd}-V{spec.vocab_size}-N{spec.n_positions}"
    return f"gpt2-{dims}-{h.hexdigest()[:32]}"


class Tokenized(Protocol):
    """What request and data checks read of a model: its dimensions and its tokenizer (a LoadedModel, or
    an API process's `compile.RemoteModel`, which has no weights)."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...


@dataclass
class LoadedModel:
    """One frozen GPT-2, its tokenizer and its dimensions."""

    name: str
    spec: ModelSpec
    weights: GPT2Weights
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

    @property
    def served_name(self) -> str:
        """The name clients see (`/ready`, `/v1/models`): a hub id as given, a local directory's name."""
        return Path(self.name).name if Path(self.name).exists() else self.name


def _dense_layers(
    w: GPT2Weights, pack: bool, quantize: str | None
) -> tuple[list[LayerDense], Dense | Int8Dense]:
    """Every dense layer of the model, and its LM head, in one layout (dense.py)."""

    def layer(weight: torch.Tensor, bias: torch.Tensor | None, head: bool = False) -> Dense | Int8Dense:
        if quantize:
            return Int8Dense(weight, bias)
        return Dense.of(weight, bias, pack, keep_plain=not head)

    layers = [
        LayerDense(
            attn=layer(lw.attn_w, lw.attn_b),
            proj=layer(lw.proj_w, lw.proj_b),
            fc=layer(lw.fc_w, lw.fc_b),
            out=layer(lw.out_w, lw.out_b),
        )
        for lw in w.layers
    ]
    return layers, layer(w.lm_head, None, head=True)


def load_hf_model(name_or_path: str | Path, dtype: torch.dtype, device: torch.device) -> GPT2LMHeadModel:
    """The checkpoint as a frozen HF module in eval mode (used by loaders, references and baselines)."""
    config = AutoConfig.from_pretrained(str(name_or_path))
    spec_from_config(config)  # reject non-GPT-2 checkpoints before loading weights
    model = GPT2LMHeadModel.from_pretrained(str(name_or_path), dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return model


def hf_cache_kwargs(
    hf: GPT2LMHeadModel, layers: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, DynamicCache]:
    """Per-layer (key, value) `[B, H, P, D]` pairs as the keyword that hands HF GPT-2 a KV cache.

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
    """Load any GPT-2-family checkpoint (hub id or local directory) once, frozen."""
    torch_dtype = parse_dtype(dtype)
    torch_device = parse_device(device)
    hf = load_hf_model(name_or_path, torch_dtype, torch_device)
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    spec, weights = spec_from_config(hf.config), GPT2Weights.from_hf(hf)
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
