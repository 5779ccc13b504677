"""Property tests (Hypothesis) for every parser of client bytes that is our own code: the native prefix
file (safetensors header and every metadata value in it), PEFT's adapter_config.json (and its LoRA
variant), and JSONL training data. Whatever the bytes (arbitrary binary, arbitrary JSON of any nesting,
text of every Unicode category, numbers in every spelling, sizes at and past each limit), the answer is
the parser's own 4xx error naming what was wrong, never another exception (which the API would turn
into a 500), and nothing is stored. Over HTTP: multipart uploads, and the OpenAI completions body (any
JSON, every field's value at and past its limit, unknown fields) answered or refused with a 4xx naming
the field. The native API's JSON bodies are also covered by schemathesis (tests/test_schema.py)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefix_store.errors import InvalidPrefixFile
from prefix_store.format import PrefixMeta, encode_prefix, parse_header
from prefix_store.importers import MAX_CONFIG_BYTES, parse_peft_config, peft_type
from prefixserve.compile import bind_model
from prefixserve.errors import InvalidRequest
from prefixserve.training.data import parse_jsonl

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# numbers as a client may spell them, JSON or not
NUMBERS = st.sampled_from(
    ["0", "-0", "1", "01", "1.0", "1e3", "1E-3", "-1e999", "1e999", "NaN", "Infinity", "-Infinity",
     "0x10", "1_000", "+1", ".5", "5.", "9" * 400, "1" + "0" * 30, "2147483648", "-9223372036854775809"]
)  # fmt: skip
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)  # every category, surrogates excluded
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=16,
)


def json_text(value) -> str:
    return json.dumps(value, ensure_ascii=False)


@st.composite
def json_with_odd_numbers(draw, base: dict) -> str:
    """`base` as JSON with some of its values replaced by arbitrary JSON or by a number spelt oddly."""
    cfg = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(base)) | TEXT, max_size=4)):
        cfg[key] = draw(JSON_VALUES)
    text = json_text(cfg)
    odd = draw(st.lists(st.tuples(st.sampled_from(sorted(cfg)), NUMBERS), max_size=2))
    for key, number in odd:  # splice a raw spelling in place of a value
        text = text.replace(json_text(key) + ": " + json_text(cfg[key]), json_text(key) + ": " + number, 1)
    return text


# ---- PEFT adapter_config.json ------------------------------------------------------------------
def peft_base(model) -> dict:
    s = model.spec
    return {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4,
        "num_layers": s.n_layer, "num_attention_heads": s.n_head, "token_dim": s.n_embd,
        "num_transformer_submodules": 1, "base_model_name_or_path": "tiny", "prefix_projection": False,
    }  # fmt: skip


def test_any_adapter_config_is_parsed_or_refused_as_invalid(tiny_model):
    binding = bind_model(tiny_model)

    @SETTINGS
    @given(st.one_of(st.binary(max_size=200), json_with_odd_numbers(peft_base(tiny_model)).map(str.encode)))
    def check(raw: bytes) -> None:
        try:
            kind = peft_type(raw)
        except InvalidPrefixFile as exc:
            assert "adapter_config.json" in str(exc)
            return
        if kind != "LORA":
            try:
                cfg = parse_peft_config(raw, binding)
            except InvalidPrefixFile as exc:
                assert "adapter_config.json" in str(exc)
                return
            assert type(cfg["num_virtual_tokens"]) is int and cfg["num_virtual_tokens"] >= 1

    check()


def test_an_adapter_config_at_and_past_its_size_limit():
    pad = MAX_CONFIG_BYTES - len(b'{"peft_type": "LORA", "x": ""}')
    at = b'{"peft_type": "LORA", "x": "' + b"a" * pad + b'"}'
    assert len(at) == MAX_CONFIG_BYTES and peft_type(at) == "LORA"
    with pytest.raises(InvalidPrefixFile, match="the limit is"):
        peft_type(at[:-2] + b'a"}')


# ---- the native prefix file --------------------------------------------------------------------
def a_prefix_file(model) -> tuple[bytes, dict]:
    kv = torch.randn(model.spec.prefix_shape(3), generator=torch.Generator().manual_seed(0)) * 0.1
    meta = PrefixMeta(
        id="pfx-prop", model_fingerprint=model.fingerprint, prefix_len=3, dtype="float32", owner="alice"
    )
    data = encode_prefix(kv, meta)
    header, _ = parse_header(data, 1 << 30)
    return data, header


def with_header(data: bytes, header_text: str) -> bytes:
    """`data`'s tensors after another header (its length field rewritten)."""
    (n,) = struct.unpack("<Q", data[:8])
    head = header_text.encode()
    return struct.pack("<Q", len(head)) + head + data[8 + n :]


def test_any_prefix_file_is_stored_or_refused_as_invalid(service_factory, tiny_model):
    svc = service_factory()
    data, header = a_prefix_file(tiny_model)
    meta = header["__metadata__"]

    @st.composite
    def files(draw) -> bytes:
        choice = draw(st.integers(0, 3))
        if choice == 0:  # any bytes at all
            return draw(st.binary(max_size=300))
        if choice == 1:  # a well-framed header of any JSON
            return with_header(data, json_text(draw(JSON_VALUES)))
        if choice == 2:  # the real header with metadata values (and keys) of any text
            new = dict(meta)
            for key in draw(st.lists(st.sampled_from(sorted(meta)) | TEXT, max_size=4)):
                new[key] = draw(TEXT | JSON_VALUES)
            return with_header(data, json_text({**header, "__metadata__": new}))
        # the real header with a tensor entry's fields (dtype, shape, offsets) of any value or spelling
        entry = header[draw(st.sampled_from([k for k in header if k != "__metadata__"]))]
        text = draw(json_with_odd_numbers(entry))
        if draw(st.booleans()):  # or an odd spelling inside its data_offsets list
            text = text.replace("[0, ", f"[{draw(NUMBERS)}, ", 1)
        return with_header(data, json_text(header).replace(json_text(entry), text, 1))

    @SETTINGS
    @given(files())
    def check(raw: bytes) -> None:
        before = {m.id for m in svc.list("alice")}
        try:
            svc.add_file(raw, owner="alice")
        except InvalidPrefixFile as exc:
            assert str(exc)  # a reason, which the API answers with 422
            assert {m.id for m in svc.list("alice")} == before  # nothing stored
            return
        # accepted: a file that still describes a valid prefix (its tensors unchanged)
        assert len({m.id for m in svc.list("alice")}) == len(before) + 1

    check()


# ---- JSONL training data -----------------------------------------------------------------------
@SETTINGS
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(JSON_VALUES.map(json_text) | TEXT | NUMBERS, max_size=6).map(
            lambda ls: "\n".join(ls).encode()
        ),
        st.lists(
            st.fixed_dictionaries({"input": TEXT | JSON_VALUES, "output": TEXT | JSON_VALUES}), max_size=4
        ).map(lambda rs: "\n".join(json_text(r) for r in rs).encode()),
    )
)
def test_any_jsonl_upload_is_parsed_or_refused_naming_its_line(raw: bytes):
    try:
        examples = parse_jsonl(raw)
    except InvalidRequest as exc:
        assert exc.status == 422 and "train" in str(exc)
        return
    assert examples and all(isinstance(e.input, str) and isinstance(e.output, str) for e in examples)


# ---- multipart uploads, over HTTP --------------------------------------------------------------
FIELDS = ["file", "adapter_config", "adapter_model", "train", "name", "visibility", "hyperparameters"]


@st.composite
def multipart_bodies(draw) -> tuple[bytes, str]:
    """A multipart body (well formed or not) and its content type."""
    boundary = draw(
        st.sampled_from(["b0undary", "x" * 70, "a b", ""]) | st.text("abcXYZ019'()+_,-./:=?", max_size=20)
    )
    if draw(st.integers(0, 4)) == 0:  # any bytes under a multipart content type
        return draw(st.binary(max_size=400)), f"multipart/form-data; boundary={boundary}"
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(FIELDS) | TEXT)
        disposition = f'form-data; name="{name}"'
        if draw(st.booleans()):
            disposition += f'; filename="{draw(TEXT)}"'
        value = draw(st.binary(max_size=200) | (TEXT | JSON_VALUES.map(json_text) | NUMBERS).map(str.encode))
        header = f"Content-Disposition: {disposition}"
        if draw(st.booleans()):
            charset = draw(st.sampled_from(["utf-8", "utf-7", "latin-1", "nope"]))
            header += f"\r\nContent-Type: text/plain; charset={charset}"
        parts.append(header.encode("utf-8", "surrogatepass") + b"\r\n\r\n" + value)
    sep = f"--{boundary}".encode()
    body = b"".join(sep + b"\r\n" + p + b"\r\n" for p in parts) + sep + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary}"


def test_any_multipart_upload_is_a_4xx_naming_the_problem_and_stores_nothing(api):
    import httpx

    from .helpers import A

    def listed() -> set[str]:
        return {p["id"] for p in httpx.get(api.url + "/prefixes", headers=A).json()["prefixes"]}

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(multipart_bodies())
    def check(case: tuple[bytes, str]) -> None:
        body, ctype = case
        before = listed()
        r = httpx.post(api.url + "/prefixes", content=body, headers={**A, "content-type": ctype}, timeout=30)
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
            assert listed() == before  # nothing stored
        elif r.status_code in (200, 201):  # accepted: a prefix or a job; leave the store as it was
            made = r.json().get("id")
            if made and made.startswith("pfx-"):
                httpx.delete(f"{api.url}/prefixes/{made}", headers=A)

    check()


def test_what_the_properties_found_is_refused_by_name(service_factory, tiny_model):
    """Found by the file property above: a tensor's dtype given as a list raised TypeError (a 500);
    JSON booleans passed as data_offsets (they are ints in Python)."""
    svc = service_factory()
    data, header = a_prefix_file(tiny_model)
    entry = header["past_key_values"]
    bad_dtype = with_header(data, json_text({**header, "past_key_values": {**entry, "dtype": ["F32"]}}))
    with pytest.raises(InvalidPrefixFile, match=r"dtype must be one of .*, got \['F32'\]"):
        svc.add_file(bad_dtype, owner="alice")
    offsets = [False, entry["data_offsets"][1]]
    bad_offsets = with_header(
        data, json_text({**header, "past_key_values": {**entry, "data_offsets": offsets}})
    )
    with pytest.raises(InvalidPrefixFile, match="no valid data_offsets"):
        svc.add_file(bad_offsets, owner="alice")
    assert svc.list("alice") == []


# ---- the OpenAI completions body, over HTTP ----------------------------------------------------
OPENAI_FIELDS = [
    "model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "best_of", "stream",
    "stream_options", "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "logit_bias",
    "seed", "user",
]  # fmt: skip
# values at and past the limits (limits.py): input characters, new tokens, choices, logprobs, stop strings
AT_LIMITS = st.sampled_from(
    ["a" * 100_000, "a" * 100_001, "x" * 257, 4096, 4097, 64, 65, 5, 6, 2**63, -(2**63) - 1, [1] * 17,
     ["s"] * 16, ["s"] * 17, [[50256]], [[]], [], {"include_usage": True}, {"50256": 100.5}, {"x": 1}]
)  # fmt: skip


@st.composite
def completion_bodies(draw, model: str) -> str:
    """A /v1/completions body: a valid one with fields replaced by arbitrary JSON, text of every Unicode
    category, values at and past the limits, numbers spelt oddly, or unknown fields; or any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return json_text(draw(JSON_VALUES))
    body = {"model": model, "prompt": "name : Aromi", "max_tokens": 2}
    for key in draw(st.lists(st.sampled_from(OPENAI_FIELDS) | TEXT, max_size=4)):
        body[key] = draw(JSON_VALUES | AT_LIMITS | TEXT)
    text = json_text(body)
    for key, number in draw(st.lists(st.tuples(st.sampled_from(sorted(body)), NUMBERS), max_size=2)):
        text = text.replace(json_text(key) + ": " + json_text(body[key]), json_text(key) + ": " + number, 1)
    return text


def sent_keys(body: str) -> list[str]:
    try:
        sent = json.loads(body)
    except ValueError:  # an odd number spelling: not JSON
        return []
    return list(sent) if isinstance(sent, dict) else []


def test_any_openai_completions_body_is_answered_or_a_4xx_naming_the_field(api):
    import httpx

    from .helpers import A

    model = httpx.get(api.url + "/v1/models", headers=A).json()["data"][0]["id"]

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(completion_bodies(model))
    def check(body: str) -> None:
        headers = {**A, "content-type": "application/json"}
        r = httpx.post(
            api.url + "/v1/completions",
            content=body.encode("utf-8", "surrogatepass"),
            headers=headers,
            timeout=60,
        )
        assert r.status_code < 500, (body[:300], r.text[:300])
        if r.status_code >= 400:
            message = r.json()["error"]["message"]
            named = {"body", *OPENAI_FIELDS, *sent_keys(body)}  # "field: ...", "field.sub: ...", "body: ..."
            names_one = any(message.startswith(f"{name}{sep}") for name in named for sep in ":.")
            assert r.status_code in (400, 404, 422) and names_one, (body[:300], message)

    check()


def test_what_the_openai_property_found_is_named(api):
    """Found by the OpenAI body property: a body that is not a JSON object, and a model validator's
    complaint, were 422s that named no field ('Input should be a valid dictionary ...', 'Value error,
    ...')."""
    import httpx

    from .helpers import A

    headers = {**A, "content-type": "application/json"}
    for raw, message in [
        ("null", "body: Input should be a valid dictionary"),
        ('{"model": "m", "prompt": "x", "max_tokens": 0}', "max_tokens: 0 is only allowed with echo: true"),
    ]:
        r = httpx.post(api.url + "/v1/completions", content=raw, headers=headers)
        assert r.status_code == 422 and r.json()["error"]["message"].startswith(message), r.text
