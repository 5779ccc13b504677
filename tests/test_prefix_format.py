"""The prefix file format and its validation: a corpus of malformed inputs, each with its own error."""

from __future__ import annotations

import io
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from prefix_store.format import (
    Expect,
    InvalidPrefixFile,
    PrefixMeta,
    check_prefix_id,
    decode_prefix,
    encode_prefix,
    read_meta,
)
from prefix_store.importers import import_peft, peft_to_canonical
from prefixserve.compile import bind_model

MAX_BYTES = 1 << 20


@pytest.fixture
def expect(tiny_model) -> Expect:
    return Expect(tiny_model.spec, tiny_model.fingerprint, max_prefix_len=64, max_bytes=MAX_BYTES)


def meta_for(model, **over) -> PrefixMeta:
    base = dict(
        id="pfx-test", model_fingerprint=model.fingerprint, prefix_len=0, dtype="float32", owner="alice"
    )
    return PrefixMeta(**{**base, **over})


def good_file(model, p: int = 5, dtype=torch.float32, **meta) -> tuple[torch.Tensor, bytes]:
    kv = torch.randn(model.spec.prefix_shape(p), generator=torch.Generator().manual_seed(p)).to(dtype)
    return kv, encode_prefix(kv, meta_for(model, **meta))


def raw_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    return st_save(tensors, metadata=metadata)


def hand_made(header: dict, buffer: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + buffer


def test_roundtrip_keeps_tensor_and_metadata(tiny_model, expect):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        kv, data = good_file(tiny_model, 7, dtype, name="support bot", visibility="public", source="text")
        back, meta = decode_prefix(data, expect)
        assert torch.equal(back.kv, kv) and back.kv.dtype == dtype
        assert (meta.prefix_len, meta.name, meta.visibility, meta.source, meta.kind) == (
            7,
            "support bot",
            "public",
            "text",
            "prefix_kv",
        )
        assert meta.model_fingerprint == tiny_model.fingerprint and len(meta.sha256) == 64
        assert meta.created_at.endswith("+00:00") and meta.format_version == "1"
        assert read_meta(data[:4096]) == meta  # from the head of the file only, for listing


def _malformed(model) -> list[tuple[str, bytes, str]]:
    """(case, bytes, expected error pattern): at least 15 ways a prefix file can be wrong."""
    spec = model.spec
    kv, good = good_file(model, 5)
    meta = read_meta(good).to_strings()
    torch_zip = io.BytesIO()
    torch.save({"past_key_values": kv}, torch_zip)
    nan = kv.clone()
    nan[1, 0, 2, 3, 4] = float("nan")
    inf = kv.clone()
    inf[0, 1, 0, 0, 0] = float("inf")
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF
    other = dict(meta, model_fingerprint="gpt2-L12-H12-C768-V50257-N1024-0123456789abcdef0123456789abcdef")
    long_kv = torch.zeros(spec.prefix_shape(65))
    return [
        ("empty file", b"", "file is empty"),
        ("shorter than the length field", b"\x01\x02\x03", "starts with an 8-byte header length"),
        ("truncated in the data", good[: len(good) - 40], r"data_offsets .* fall outside"),
        ("truncated in the header", good[:20], "runs past the end"),
        (
            "huge header length",
            struct.pack("<Q", 2**40) + b"{}",
            "header length 1099511627776 exceeds the limit",
        ),
        (
            "header past end of file",
            struct.pack("<Q", 5000) + b'{"a": 1}',
            "header of 5000 bytes runs past the end",
        ),
        ("header not JSON", struct.pack("<Q", 4) + b"\xff\xfe{[", "not valid UTF-8 JSON"),
        ("header not an object", hand_made([1, 2], b""), "must be a JSON object"),  # type: ignore[arg-type]
        (
            "overlapping offsets",
            hand_made(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                bytes(12),
            ),
            "overlap",
        ),
        (
            "gap between tensors",
            hand_made(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
                },
                bytes(12),
            ),
            "gap before tensor 'b'",
        ),
        (
            "missing data_offsets",
            hand_made({"past_key_values": {"dtype": "F32", "shape": [1]}}, b""),
            "no valid data_offsets",
        ),
        ("pickle renamed .safetensors", pickle.dumps({"past_key_values": [1.0]}), "Python pickle"),
        ("zip (torch.save) renamed .safetensors", torch_zip.getvalue(), "zip archive"),
        (
            "wrong tensor name",
            raw_file({"prompt_embeddings": kv}, meta),
            r"expected exactly the tensor \['past_key_values'\], found \['prompt_embeddings'\]",
        ),
        (
            "extra tensor",
            raw_file({"past_key_values": kv, "extra": torch.zeros(1)}, meta),
            r"found \['extra', 'past_key_values'\]",
        ),
        (
            "wrong dtype",
            raw_file({"past_key_values": kv.double()}, meta),
            r"dtype must be one of \['BF16', 'F16', 'F32'\], got 'F64'",
        ),
        ("integer dtype", raw_file({"past_key_values": kv.int()}, meta), "got 'I32'"),
        (
            "wrong shape",
            raw_file({"past_key_values": torch.zeros(3, 2, 4, 5, 8)}, meta),
            r"shape must be \[3, 2, 4, 5, 16\] for this model, got \[3, 2, 4, 5, 8\]",
        ),
        (
            "4 dims",
            raw_file({"past_key_values": torch.zeros(3, 2, 4, 5)}, meta),
            r"\(5 dims\), got \[3, 2, 4, 5\]",
        ),
        ("NaN", encode_prefix(nan, meta_for(model)), "NaN or Inf"),
        ("Inf", encode_prefix(inf, meta_for(model)), "NaN or Inf"),
        (
            "prefix for another model",
            raw_file({"past_key_values": kv}, other),
            "made for model gpt2-L12-H12-C768.*but this server runs gpt2-L3-H4-C64",
        ),
        (
            "prefix longer than allowed",
            encode_prefix(long_kv, meta_for(model)),
            r"prefix length must be in \[1, 64\], got 65",
        ),
        ("corrupted tensor bytes", bytes(flipped), "do not match the sha256"),
        ("no metadata", raw_file({"past_key_values": kv}, None), "no __metadata__"),
        (
            "metadata missing fields",
            raw_file({"past_key_values": kv}, {"kind": "prefix_kv"}),
            "metadata is missing",
        ),
        (
            "unknown format version",
            raw_file({"past_key_values": kv}, dict(meta, format_version="9")),
            "format_version must be '1', got '9'",
        ),
        ("unknown kind", raw_file({"past_key_values": kv}, dict(meta, kind="ia3")), "kind must be one of"),
        (
            "positions for a weight-side kind",
            raw_file({"past_key_values": kv}, dict(meta, kind="lora")),
            "prefix_len must be >= 1 for a prefix_kv prefix and 0 for the other kinds",
        ),
        (
            "metadata length disagrees",
            raw_file({"past_key_values": kv}, dict(meta, prefix_len="6")),
            "metadata prefix_len 6 does not match the tensor's length 5",
        ),
        (
            "metadata dtype disagrees",
            raw_file({"past_key_values": kv.half()}, meta),
            "metadata dtype 'float32' does not match the tensor's 'float16'",
        ),
        (
            "bad id in metadata",
            raw_file({"past_key_values": kv}, dict(meta, id="../../etc/passwd")),
            "prefix id must match",
        ),
        ("over the size cap", good + bytes(MAX_BYTES), f"the limit is {MAX_BYTES}"),
    ]


def test_malformed_corpus_each_rejected_with_its_own_error(tiny_model, expect):
    corpus = _malformed(tiny_model)
    assert len(corpus) >= 15
    for case, data, pattern in corpus:
        with pytest.raises(InvalidPrefixFile, match=pattern):
            decode_prefix(data, expect)
            pytest.fail(f"{case}: accepted")


def test_ids_are_strict(tiny_model):
    for good in ("pfx-0123", "support_bot", "abc"):
        assert check_prefix_id(good) == good
    for bad in ("", "ab", "../x", "a/b", "A-upper", "x" * 65, ".hidden", "a b", "-lead", None):
        with pytest.raises(InvalidPrefixFile, match="prefix id must match"):
            check_prefix_id(bad)  # type: ignore[arg-type]


# ---- PEFT configs ----------------------------------------------------------------------------------
def peft_files(model, peft_type="PREFIX_TUNING", p=4, **cfg_over) -> tuple[bytes, bytes]:
    spec = model.spec
    width = spec.n_layer * 2 * spec.n_embd if peft_type == "PREFIX_TUNING" else spec.n_embd
    cfg = {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": p,
        "num_layers": spec.n_layer,
        "num_attention_heads": spec.n_head,
        "token_dim": spec.n_embd,
        "num_transformer_submodules": 1,
    }
    cfg.update(cfg_over)
    return json.dumps(cfg).encode(), st_save({"prompt_embeddings": torch.randn(p, width)})


@pytest.mark.parametrize(
    ("cfg_over", "weights", "pattern"),
    [
        (
            {"peft_type": "IA3"},
            None,
            r"peft_type must be one of \['PREFIX_TUNING', 'PROMPT_TUNING', 'LORA'\], got 'IA3'",
        ),
        ({"peft_type": "LORA"}, None, "is a LORA adapter; expected prefix or prompt tuning"),
        ({"task_type": "SEQ_CLS"}, None, "task_type must be 'CAUSAL_LM', got 'SEQ_CLS'"),
        ({"num_layers": 12}, None, "num_layers is 12, but the loaded model has 3"),
        ({"token_dim": 768}, None, "token_dim is 768, but the loaded model has 64"),
        ({"num_attention_heads": 12}, None, "num_attention_heads is 12, but the loaded model has 4"),
        ({"num_virtual_tokens": 0}, None, "num_virtual_tokens must be a positive integer, got 0"),
        ({"num_virtual_tokens": 6}, None, r"must have shape \[6, 384\] .* got \[4, 384\]"),
        ({}, {"prompt_embeddings": torch.randn(4, 64)}, r"must have shape \[4, 384\] .* got \[4, 64\]"),
        ({}, {"other": torch.randn(4, 384)}, r"must hold exactly \['prompt_embeddings'\], found \['other'\]"),
        ({}, {"prompt_embeddings": torch.full((4, 384), float("nan"))}, "NaN or Inf"),
    ],
)
def test_wrong_peft_adapters_are_named(tiny_model, cfg_over, weights, pattern):
    cfg, w = peft_files(tiny_model, **cfg_over)
    if weights is not None:
        w = st_save(weights)
    with pytest.raises(InvalidPrefixFile, match=pattern):
        import_peft(cfg, w, bind_model(tiny_model), MAX_BYTES)


def test_peft_config_not_json_and_pickled_weights(tiny_model):
    cfg, w = peft_files(tiny_model)
    with pytest.raises(InvalidPrefixFile, match=r"adapter_config\.json is not valid JSON"):
        import_peft(b"{nope", w, bind_model(tiny_model), MAX_BYTES)
    with pytest.raises(InvalidPrefixFile, match="Python pickle"):
        import_peft(cfg, pickle.dumps({"prompt_embeddings": 1}), bind_model(tiny_model), MAX_BYTES)


def test_peft_layout_matches_pefts_own_split(tiny_model):
    """Invariant 1: layer l's key is row 2l and its value row 2l+1 of PEFT's [L*2, H, P, D] split."""
    spec = tiny_model.spec
    emb = torch.randn(6, spec.n_layer * 2 * spec.n_embd)
    kv = peft_to_canonical(emb, spec.n_layer, spec.n_head)
    pk = emb.view(6, spec.n_layer * 2, spec.n_head, spec.head_dim).permute(1, 2, 0, 3)  # PEFT's split
    for layer in range(spec.n_layer):
        assert torch.equal(kv[layer, 0], pk[2 * layer]) and torch.equal(kv[layer, 1], pk[2 * layer + 1])
