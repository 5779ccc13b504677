"""Client input never causes a 5xx (architecture.md invariant 12), against a live server: deeply nested
JSON at every JSON entry point, PEFT weights checked before use (dtype, shape, byte span), PEFT
configs for another base model, prefixes that leave no room to generate, lone surrogates, strict
integers, and an unexpected error that answers a JSON 500 on a connection that stays usable."""

from __future__ import annotations

import json
import struct

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from prefixserve.inputs import MAX_JSON_DEPTH, JsonTooDeep, parse_json

from .helpers import A, native_file

DEEP = "[" * 100_000 + "]" * 100_000  # past the parser's recursion limit
JUST_TOO_DEEP = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)  # parses, then fails the depth check
TOO_DEEP = f"expected JSON nested at most {MAX_JSON_DEPTH} levels deep"
JSONL_LINE = b'{"input": "name : Aromi", "output": "Aromi."}\n'


@pytest.fixture(scope="module")
def live(module_live_server):
    """max_prefix_len above what the tiny model's 256 positions can serve, room for long uploads."""
    return module_live_server(max_prefix_len=512, max_upload_bytes=1 << 20)


def post_json(live, path: str, raw: str | bytes) -> httpx.Response:
    return httpx.post(live.url + path, content=raw, headers={**A, "content-type": "application/json"})


def upload(live, files: dict, data: dict | None = None, **headers) -> httpx.Response:
    return httpx.post(live.url + "/prefixes", files=files, data=data, headers={**A, **headers})


def peft_config(model, p: int = 3, **over) -> str:
    spec = model.spec
    cfg = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": p,
        "num_layers": spec.n_layer,
        "num_attention_heads": spec.n_head,
        "token_dim": spec.n_embd,
    }
    return json.dumps({**cfg, **over})


def peft_weights(model, p: int = 3, width: int | None = None, dtype=torch.float32) -> bytes:
    width = width or model.spec.n_layer * 2 * model.spec.n_embd
    return st_save({"prompt_embeddings": torch.randn(p, width).to(dtype)})


def peft(live, cfg: str | bytes, weights: bytes) -> httpx.Response:
    return upload(
        live,
        {
            "adapter_config": ("adapter_config.json", cfg),
            "adapter_model": ("adapter_model.safetensors", weights),
        },
    )


def safetensors_bytes(header: dict | str, buffer: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + buffer


def assert_4xx(r: httpx.Response, *needles: str, status: int = 422) -> None:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for needle in needles:
        assert needle in message, message


# ---- deeply nested JSON ------------------------------------------------------------------------
def test_parse_json_bounds_depth_without_recursion_errors():
    assert parse_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None  # at the limit: fine
    for raw in (JUST_TOO_DEEP, DEEP, '{"a": ' * 50_000 + "1" + "}" * 50_000):
        with pytest.raises(JsonTooDeep, match=TOO_DEEP):
            parse_json(raw)
    with pytest.raises(ValueError, match="4300 digits"):  # json's int limit, a ValueError like the rest
        parse_json("1" * 5000)


@pytest.mark.parametrize("nested", [DEEP, JUST_TOO_DEEP], ids=["recursion-limit", "depth-limit"])
@pytest.mark.parametrize(
    "entry",
    [
        "prefixes-json-body",
        "prefixes-json-field",
        "hyperparameters",
        "jsonl",
        "adapter_config",
        "peft-weights-header",
        "native-file-header",
        "generate-body",
        "completions-body",
    ],
)
def test_deep_json_is_a_422_at_every_json_entry_point(live, tiny_model, entry, nested):
    capped = entry in ("adapter_config", "peft-weights-header", "native-file-header")  # 64 KiB
    if capped and len(nested) > 60_000:
        nested = "[" * 30_000 + "]" * 30_000  # under the cap, still past the parser's recursion limit
    body = {
        "prefixes-json-body": lambda: post_json(live, "/prefixes", nested),
        "prefixes-json-field": lambda: post_json(live, "/prefixes", f'{{"text": {nested}}}'),
        "hyperparameters": lambda: upload(
            live, {"train": ("t.jsonl", JSONL_LINE)}, {"hyperparameters": nested}
        ),
        "jsonl": lambda: upload(
            live, {"train": ("t.jsonl", f'{{"input": {nested}, "output": "x"}}'.encode())}
        ),
        "adapter_config": lambda: peft(live, f'{{"x": {nested}}}', peft_weights(tiny_model)),
        "peft-weights-header": lambda: peft(live, peft_config(tiny_model), safetensors_bytes(nested, b"")),
        "native-file-header": lambda: upload(
            live, {"file": ("p.safetensors", safetensors_bytes(nested, b""))}
        ),
        "generate-body": lambda: post_json(live, "/generate", f'{{"input": {nested}}}'),
        "completions-body": lambda: post_json(
            live, "/v1/completions", f'{{"model": "x", "prompt": {nested}}}'
        ),
    }[entry]()
    assert_4xx(body, TOO_DEEP)


# ---- PEFT weights and configs ------------------------------------------------------------------
def _bad_weights(model) -> list[tuple[str, bytes, str]]:
    spec = model.spec
    p, width = 3, spec.n_layer * 2 * spec.n_embd
    need = p * width * 4

    def hand(dtype: str, shape, offsets: list[int], buffer: bytes) -> bytes:
        info = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        return safetensors_bytes({"prompt_embeddings": info}, buffer)

    floats = "dtype must be one of ['BF16', 'F16', 'F32']"
    return [
        ("unknown dtype", hand("XYZ", [p, width], [0, need], bytes(need)), f"{floats}, got 'XYZ'"),
        ("int32", peft_weights(model, dtype=torch.int32), f"{floats}, got 'I32'"),
        ("bool", peft_weights(model, dtype=torch.bool), f"{floats}, got 'BOOL'"),
        ("complex64", peft_weights(model, dtype=torch.complex64), f"{floats}, got 'C64'"),
        ("float64", peft_weights(model, dtype=torch.float64), f"{floats}, got 'F64'"),
        ("shape not a list", hand("F32", "x", [0, 12], bytes(12)), "shape must be a list of non-negative"),
        ("shape with a bool", hand("F32", [True, width], [0, width * 4], bytes(width * 4)), "non-negative"),
        ("wrong shape", peft_weights(model, width=spec.n_embd), f"must have shape [3, {width}]"),
        ("bytes short of the shape", hand("F32", [p, width], [0, 12], bytes(12)), f"needs {need} bytes"),
        ("truncated data", hand("F32", [p, width], [0, need], bytes(need))[:-100], "fall outside"),
    ]


def test_peft_weights_are_validated_before_use(live, tiny_model):
    for case, weights, needle in _bad_weights(tiny_model):
        r = peft(live, peft_config(tiny_model), weights)
        assert r.status_code == 422, f"{case}: {r.status_code} {r.text}"
        assert needle in r.json()["error"]["message"], f"{case}: {r.text}"


def test_peft_config_must_match_the_served_models_dimensions(live, tiny_model):
    medium = peft_config(
        tiny_model,
        base_model_name_or_path="gpt2-medium",
        token_dim=1024,
        num_layers=24,
        num_attention_heads=16,
    )
    assert_4xx(
        peft(live, medium, peft_weights(tiny_model)),
        "for base model 'gpt2-medium'",
        f"this server's model {live.state.model.served_name!r}",
        "num_layers is 24, but the loaded model has 3",
        "token_dim is 1024, but the loaded model has 64",
    )
    no_dims = {k: v for k, v in json.loads(peft_config(tiny_model)).items() if k != "token_dim"}
    assert_4xx(peft(live, json.dumps(no_dims), peft_weights(tiny_model)), "token_dim must be an integer")
    # another name (a local copy has a path) with the served model's dimensions is accepted
    local = peft_config(tiny_model, base_model_name_or_path="/models/my-gpt2-copy")
    assert peft(live, local, peft_weights(tiny_model)).status_code == 201


# ---- prefix length -----------------------------------------------------------------------------
def test_prefixes_that_leave_no_room_to_generate_are_rejected_at_upload(live, tiny_model):
    spec = tiny_model.spec
    longest = spec.n_positions - 2  # the prefix, one input token and one new token fill the context
    limit = f"at most {longest}"
    assert_4xx(
        upload(live, {"file": ("p.safetensors", native_file(tiny_model, longest + 1))}),
        f"prefix length must be in [1, {longest}], got {longest + 1}",
    )
    prompt = peft_config(tiny_model, longest + 1, peft_type="PROMPT_TUNING")
    assert_4xx(
        peft(live, prompt, peft_weights(tiny_model, longest + 1, spec.n_embd)),
        f"num_virtual_tokens is {longest + 1}",
        limit,
    )
    prefix = peft_config(tiny_model, longest + 1)
    assert_4xx(
        peft(live, prefix, peft_weights(tiny_model, longest + 1)), f"num_virtual_tokens is {longest + 1}"
    )
    assert_4xx(httpx.post(live.url + "/prefixes", json={"text": "word " * 300}, headers=A), limit)
    train = {"train": {"examples": [{"input": "a", "output": "b"}], "prefix_len": longest + 1}}
    assert_4xx(httpx.post(live.url + "/prefixes", json=train, headers=A), "prefix_len", limit)
    # the longest one is stored and serves a one-token input
    r = upload(live, {"file": ("p.safetensors", native_file(tiny_model, longest))})
    assert r.status_code == 201, r.text
    body = {"prefix_id": r.json()["id"], "input": "a", "max_new_tokens": 1}
    assert httpx.post(live.url + "/generate", json=body, headers=A).status_code == 200


# ---- lone surrogates ---------------------------------------------------------------------------
SURROGATE_BODIES = [
    ("/generate", b'{"input": "ok \\ud800"}', "input"),
    ("/generate", b'{"input": "x", "stop": ["\\udfff"]}', "stop"),
    ("/generate", b'{"input": "x", "stop": "\\ud800"}', "stop"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["\\ud800"]}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}', "stop"),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "x"}', "model"),
    ("/prefixes", b'{"text": "\\ud800"}', "text"),
    ("/prefixes", b'{"text": "x", "name": "\\ud800"}', "name"),
    (
        "/prefixes",
        b'{"train": {"examples": [{"input": "\\ud800", "output": "b"}]}}',
        "train.examples.0.input",
    ),
    (
        "/prefixes",
        b'{"train": {"examples": [{"input": "a", "output": "b"}], "separator": "\\udc00"}}',
        "separator",
    ),
]


@pytest.mark.parametrize(("path", "raw", "field"), SURROGATE_BODIES)
def test_lone_surrogates_are_a_422_naming_the_field(live, path, raw, field):
    assert_4xx(post_json(live, path, raw), f"{field}: ", "lone surrogate")


def test_lone_surrogates_in_uploads_are_a_422(live, tiny_model):
    jsonl = upload(live, {"train": ("t.jsonl", b'{"input": "\\ud800", "output": "b"}\n')})
    assert_4xx(jsonl, "train line 1", "lone surrogate")
    # a multipart charset can decode to a lone surrogate too ("+2AA-" is U+D800 in UTF-7)
    file = native_file(tiny_model)
    body = (
        b'--XX\r\nContent-Disposition: form-data; name="name"\r\n\r\n+2AA-\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="p"\r\n\r\n'
        + file
        + b"\r\n--XX--\r\n"
    )
    form = "multipart/form-data; charset=utf-7; boundary=XX"
    r = httpx.post(live.url + "/prefixes", content=body, headers={**A, "content-type": form})
    assert_4xx(r, "name: ", "lone surrogate")
    # a native file whose header metadata (JSON) carries one
    n = struct.unpack("<Q", file[:8])[0]
    header = json.loads(file[8 : 8 + n])
    header["__metadata__"]["name"] = "\ud800"
    assert_4xx(
        upload(live, {"file": ("p", safetensors_bytes(header, file[8 + n :]))}),
        "metadata name",
        "lone surrogate",
    )


# ---- strict integers ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["3", 2.0, True], ids=["string", "float", "bool"])
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", {"input": "x"}, "max_new_tokens"),
        ("/generate", {"input": "x"}, "top_k"),
        ("/generate", {"input": "x"}, "seed"),
        ("/v1/completions", {"model": "tiny", "prompt": "x"}, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x"}, "seed"),
        ("/prefixes", {"train": {"examples": [{"input": "a", "output": "b"}]}}, "epochs"),
    ],
)
def test_integer_fields_are_strict(live, path, body, field, value):
    nested = "train" in body
    body = {"train": {**body["train"], field: value}} if nested else {**body, field: value}
    r = httpx.post(live.url + path, json=body, headers=A)
    assert_4xx(
        r, f"{'train.' * nested}{field}: Input should be a valid integer", f"got {type(value).__name__}"
    )


def test_hyperparameters_upload_integers_are_strict(live):
    r = upload(live, {"train": ("t.jsonl", JSONL_LINE)}, {"hyperparameters": '{"epochs": 2.0}'})
    assert_4xx(r, "epochs: Input should be a valid integer")


def test_float_fields_still_take_integers(live):
    """OpenAI SDKs and curl users send `"temperature": 1`."""
    model = live.state.model.served_name
    r = httpx.post(
        live.url + "/v1/completions",
        json={"model": model, "prompt": "x", "max_tokens": 2, "temperature": 1, "top_p": 1, "seed": 1},
        headers=A,
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        live.url + "/generate",
        json={"input": "x", "max_new_tokens": 2, "temperature": 1, "top_p": 1},
        headers=A,
    )
    assert r.status_code == 200, r.text


# ---- an unexpected error ---------------------------------------------------------------------
def test_unexpected_error_is_a_json_500_on_a_connection_that_stays_usable(live, monkeypatch):
    connects = []

    def trace(event: str, info: dict) -> None:
        if event == "connection.connect_tcp.complete":
            connects.append(info)

    def broken(tenant: str):
        raise RuntimeError("injected fault in the prefix service")

    with httpx.Client(base_url=live.url, headers=A) as client:
        monkeypatch.setattr(live.state.service, "list", broken)
        r = client.get("/prefixes", extensions={"trace": trace})
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json() == {"error": {"type": "server_error", "message": "internal server error"}}
        monkeypatch.undo()
        again = client.get("/prefixes", extensions={"trace": trace})
        assert again.status_code == 200
    assert len(connects) == 1  # the second request reused the keep-alive connection
