"""Importers: PEFT prefix tuning, PEFT prompt tuning and plain text, each to canonical K/V; PEFT LoRA
to the `lora` kind's tensors (kinds/lora.py).

Canonical layout (docs/architecture.md invariant 1): `[n_layer, 2, n_head, P, head_dim]`. PEFT's prefix tuning
`prompt_embeddings [P, n_layer*2*n_embd]` maps to it as PEFT itself does: view
`[P, n_layer*2, n_head, head_dim]`, permute to `[n_layer*2, n_head, P, head_dim]`, layer l's key is
row 2l and its value row 2l+1. With `prefix_projection`, PEFT saves the projected embeddings, so both
variants import the same way. Prompt tuning (a soft prompt `[P, n_embd]`) is run once through the
frozen model (`ModelBinding.compile_embeds`, on the server side); its per-layer K/V are the prefix.
Text is compiled on the server side too (`prefixserve.compile.text_to_kv`).
"""

from __future__ import annotations

import re

import torch

from .binding import ModelBinding
from .format import InvalidPrefixFile, all_finite, parse_header, tensor_from_raw, tensor_layout, tensor_raw
from .inputs import parse_json
from .limits import longest_usable_prefix

PEFT_TENSOR = "prompt_embeddings"
PEFT_TYPES = ("PREFIX_TUNING", "PROMPT_TUNING", "LORA")
# a PEFT LoRA weight (PEFT's save prefix optional) of GPT-2: transformer.h.<layer>.<module>.lora_<A|B>.weight,
# or of the Llama family: model.layers.<layer>.<module>.lora_<A|B>.weight
LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:transformer\.h|model\.layers)\.(\d+)\."
    r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj|self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.lora_([AB])\.weight$"
)
LORA_LAYOUT = {"gpt2": "transformer.h", "llama": "model.layers"}  # where a family's layers are
# LoRA options this server does not serve; each must be absent or have this (PEFT's default) value
LORA_UNSUPPORTED = {"use_dora": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {}}
MAX_CONFIG_BYTES = 64 * 1024


def peft_to_canonical(emb: torch.Tensor, n_layer: int, n_head: int) -> torch.Tensor:
    """`[P, n_layer*2*n_embd]` -> `[n_layer, 2, n_head, P, head_dim]`, exactly as PEFT splits it."""
    p, width = emb.shape
    d = width // (n_layer * 2 * n_head)
    kv = emb.view(p, n_layer * 2, n_head, d).permute(1, 2, 0, 3)  # [L*2, H, P, D]
    return kv.reshape(n_layer, 2, n_head, p, d).contiguous()


def peft_type(raw: bytes) -> str:
    """adapter_config.json's peft_type (checked), to choose the importer."""
    return _peft_json(raw)["peft_type"]


def _peft_json(raw: bytes) -> dict:
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidPrefixFile(f"adapter_config.json is {len(raw)} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        cfg = parse_json(raw.decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON, or nested too deeply
        raise InvalidPrefixFile(f"adapter_config.json is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise InvalidPrefixFile("adapter_config.json must be a JSON object")
    kind = cfg.get("peft_type")
    if kind not in PEFT_TYPES:
        raise InvalidPrefixFile(
            f"adapter_config.json peft_type must be one of {list(PEFT_TYPES)}, got {kind!r}"
        )
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise InvalidPrefixFile(
            f"adapter_config.json task_type must be 'CAUSAL_LM', got {cfg.get('task_type')!r}"
        )
    return cfg


def parse_peft_config(raw: bytes, model: ModelBinding) -> dict:
    """Check a prefix- or prompt-tuning adapter_config.json against the loaded model; every mismatch
    names both values."""
    cfg = _peft_json(raw)
    if cfg["peft_type"] == "LORA":
        raise InvalidPrefixFile("adapter_config.json is a LORA adapter; expected prefix or prompt tuning")
    _check_base_model(cfg, model)
    subs = cfg.get("num_transformer_submodules", 1)
    if subs != 1:
        raise InvalidPrefixFile(f"adapter_config.json num_transformer_submodules must be 1, got {subs!r}")
    n = cfg.get("num_virtual_tokens")
    if type(n) is not int or n < 1:
        raise InvalidPrefixFile(
            f"adapter_config.json num_virtual_tokens must be a positive integer, got {n!r}"
        )
    return cfg


def _check_base_model(cfg: dict, model: ModelBinding) -> None:
    """The adapter's dimensions must be the served model's. Its `base_model_name_or_path` is only named
    in the error: a matching model may live under any name or local path. PEFT's prefix tuning records
    the KV heads and their width (grouped-query attention: fewer than the query heads), prompt tuning
    the query heads and the embedding width."""
    spec = model.spec
    if cfg["peft_type"] == "PREFIX_TUNING":
        heads, width = spec.n_kv_head, spec.kv_width
    else:
        heads, width = spec.n_head, spec.n_embd
    expected = {"num_layers": spec.n_layer, "num_attention_heads": heads, "token_dim": width}
    for key in expected:
        if type(cfg.get(key)) is not int:
            raise InvalidPrefixFile(f"adapter_config.json {key} must be an integer, got {cfg.get(key)!r}")
    wrong = [
        f"{k} is {cfg[k]}, but the loaded model has {want}" for k, want in expected.items() if cfg[k] != want
    ]
    if wrong:
        raise InvalidPrefixFile(
            f"adapter_config.json is for base model {cfg.get('base_model_name_or_path')!r}, which does not"
            f" match this server's model {model.served_name!r}: {'; '.join(wrong)}"
        )


def import_peft(
    config_raw: bytes,
    weights_raw: bytes,
    model: ModelBinding,
    max_bytes: int,
    max_prefix_len: int | None = None,
) -> torch.Tensor:
    """A PEFT prefix-tuning or prompt-tuning adapter -> canonical K/V `[L, 2, Hkv, P, D]` (CPU, fp32).
    The weights are checked like a native file (float dtype, exact shape, byte span) before use;
    `max_prefix_len` defaults to the longest prefix the model's context can still serve."""
    cfg = parse_peft_config(config_raw, model)
    spec, p = model.spec, cfg["num_virtual_tokens"]
    limit = max_prefix_len or longest_usable_prefix(spec.n_positions)
    if p > limit:
        raise InvalidPrefixFile(
            f"adapter_config.json num_virtual_tokens is {p}; a prefix may be at most {limit} (max_prefix_len,"
            " or less where the model's context must still hold one input token and one new token)"
        )
    header, start = parse_header(weights_raw, max_bytes)  # structure, then each field, then the bytes
    names = sorted(k for k in header if k != "__metadata__")
    if names != [PEFT_TENSOR]:
        raise InvalidPrefixFile(
            f"adapter_model.safetensors must hold exactly ['{PEFT_TENSOR}'], found {names}"
        )
    width = spec.n_layer * 2 * spec.kv_width if cfg["peft_type"] == "PREFIX_TUNING" else spec.n_embd
    where = f" for a {cfg['peft_type']} adapter on this model"
    emb = _peft_tensor(weights_raw, header, start, PEFT_TENSOR, [p, width], where)  # [P, width]
    if cfg["peft_type"] == "PREFIX_TUNING":
        return peft_to_canonical(emb, spec.n_layer, spec.n_kv_head)
    return model.compile_embeds(emb)


def _peft_tensor(
    data: bytes, header: dict, start: int, name: str, want: list[int], where: str
) -> torch.Tensor:
    """One tensor of a PEFT weights file, checked like a native file's (float dtype, exactly `want`,
    its byte span, finite values) before it is built; float32."""
    dtype, shape = tensor_layout(header, name)
    if shape != want:
        raise InvalidPrefixFile(f"{name} must have shape {want}{where}, got {shape}")
    raw = tensor_raw(data, header, start, name, dtype, shape)
    if not all_finite(raw, dtype):
        raise InvalidPrefixFile(f"{name} contains NaN or Inf values")
    return tensor_from_raw(raw, dtype, shape).float()


def import_peft_lora(config_raw: bytes, weights_raw: bytes, model: ModelBinding, max_bytes: int) -> dict:
    """A PEFT LoRA adapter of the served model (GPT-2, or the Llama family) -> the `lora` kind's tensors
    (CPU, fp32): per module `lora_a.<module>` = A^T `[L, in, r]` and `lora_b.<module>` = B^T * scaling
    `[L, r, out]`, with PEFT's scaling lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). Every
    layer of an adapted module must be present; shapes, dtypes and byte spans are checked like a native
    file's before use."""
    cfg = _peft_json(config_raw)
    if cfg["peft_type"] != "LORA":
        raise InvalidPrefixFile(
            f"adapter_config.json peft_type must be 'LORA' here, got {cfg['peft_type']!r}"
        )
    for key, default in LORA_UNSUPPORTED.items():
        if cfg.get(key, default) not in (default, None):
            raise InvalidPrefixFile(
                f"adapter_config.json {key} must be {default!r} (not served), got {cfg[key]!r}"
            )
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if type(r) is not int or r < 1 or type(alpha) not in (int, float):
        raise InvalidPrefixFile(
            "adapter_config.json needs r (a positive integer) and lora_alpha (a number),"
            f" got {r!r} and {alpha!r}"
        )
    scaling = alpha / (r**0.5 if cfg.get("use_rslora") else r)
    spec = model.spec
    dims = spec.lora_modules()
    header, start = parse_header(weights_raw, max_bytes)
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in sorted(k for k in header if k != "__metadata__"):
        match = LORA_KEY.match(name)
        if match is None:
            raise InvalidPrefixFile(
                f"adapter_model.safetensors holds {name!r}; expected only LoRA weights of this model's"
                f" {', '.join(dims)}"
                f" ({LORA_LAYOUT[spec.family]}.<layer>.<module>.lora_A.weight / lora_B.weight)"
            )
        layer, module, ab = int(match[1]), match[2], match[3]
        if module not in dims or not name.removeprefix("base_model.model.").startswith(
            LORA_LAYOUT[spec.family]
        ):
            raise InvalidPrefixFile(
                f"{name}: {module} is not a module of this model ({spec.family}); LoRA may adapt {list(dims)}"
            )
        if layer >= spec.n_layer:
            raise InvalidPrefixFile(f"{name}: layer {layer}, but the loaded model has {spec.n_layer} layers")
        fin, fout = dims[module]
        want = [r, fin] if ab == "A" else [fout, r]
        tensor = _peft_tensor(weights_raw, header, start, name, want, f" (r = {r}) for this model")
        found.setdefault(module, {}).setdefault(layer, {})[ab] = tensor
    if not found:
        raise InvalidPrefixFile("adapter_model.safetensors holds no LoRA weights")
    tensors = {}
    for module, layers in found.items():
        missing = [i for i in range(spec.n_layer) if set(layers.get(i, {})) != {"A", "B"}]
        if missing:
            raise InvalidPrefixFile(
                f"LoRA weights of {module} are missing for layers {missing}: every layer of an adapted module"
                " must have lora_A and lora_B"
            )
        tensors[f"lora_a.{module}"] = torch.stack(
            [layers[i]["A"].T for i in range(spec.n_layer)]
        )  # [L, in, r]
        tensors[f"lora_b.{module}"] = torch.stack([layers[i]["B"].T * scaling for i in range(spec.n_layer)])
    return tensors
