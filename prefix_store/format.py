"""The prefix file: one self-describing safetensors file per prefix.

Each kind (kinds/: `prefix_kv`, tensor `past_key_values` `[n_layer, 2, n_head, P, head_dim]`,
architecture.md invariant 1; `ntk`, NTK-Attention's `ntk_k` and `ntk_z` or its low-rank factors, no
positions) names its tensors and checks their shapes and magnitudes. Every file carries string
metadata (format version, kind, model fingerprint, length, dtype, name, owner, visibility, source,
created_at, sha256 of the tensor bytes in name order). Reading never unpickles: the header is parsed
here, checked field by field (each error names what was expected and what was found), and only then
is the tensor built from the raw bytes.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

import numpy as np
import torch
from safetensors.torch import save as st_save

from .bounds import Expect, MagnitudeBounds
from .errors import InvalidPrefixFile as InvalidPrefixFile
from .inputs import check_text, parse_json
from .kinds import BY_NAME, KINDS, TENSOR_SETS, kind_with_tensors
from .kinds.kv import TENSOR_NAME
from .limits import KIND_PREFIX_KV, MAX_NAME_LEN, VISIBILITIES
from .state import PrefixState

FORMAT_VERSION = "1"
SOURCES = ("upload", "peft", "text", "train")
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MAX_HEADER_BYTES = 64 * 1024
PREFIX_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{2,63}$")
OPTIONAL = {"input_suffix": ""}  # metadata added after format version 1 first shipped


def check_prefix_id(prefix_id: str) -> str:
    """Ids become file names, so they match a strict pattern before anything else happens."""
    if not isinstance(prefix_id, str) or not PREFIX_ID.match(prefix_id):
        raise InvalidPrefixFile(
            f"prefix id must match {PREFIX_ID.pattern} (3-64 chars: a-z, 0-9, '_', '-'), got {prefix_id!r}"
        )
    return prefix_id


@dataclass(frozen=True)
class PrefixMeta:
    """What a prefix file says about itself (all stored as strings in the safetensors header)."""

    id: str
    model_fingerprint: str
    prefix_len: int
    dtype: str
    owner: str
    name: str = ""
    visibility: str = "private"
    source: str = "upload"
    kind: str = KIND_PREFIX_KV
    format_version: str = FORMAT_VERSION
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    sha256: str = ""
    input_suffix: str = ""  # appended to every input at serving time (a trained prefix's separator)

    def to_strings(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_strings(cls, raw: dict[str, str]) -> PrefixMeta:
        raw = {**OPTIONAL, **raw}
        missing = [f.name for f in fields(cls) if f.name not in raw]
        if missing:
            raise InvalidPrefixFile(f"metadata is missing {missing}; found keys {sorted(raw)}")
        if raw["format_version"] != FORMAT_VERSION:
            raise InvalidPrefixFile(
                f"format_version must be {FORMAT_VERSION!r}, got {raw['format_version']!r}"
            )
        if raw["kind"] not in KINDS:
            raise InvalidPrefixFile(f"kind must be one of {list(KINDS)}, got {raw['kind']!r}")
        if not raw["prefix_len"].isdigit():
            raise InvalidPrefixFile(f"prefix_len must be a positive integer, got {raw['prefix_len']!r}")
        meta = cls(
            **{f.name: raw[f.name] for f in fields(cls) if f.name != "prefix_len"},
            prefix_len=int(raw["prefix_len"]),
        )
        meta.check()
        return meta

    def check(self) -> None:
        check_prefix_id(self.id)
        if self.visibility not in VISIBILITIES:
            raise InvalidPrefixFile(
                f"visibility must be one of {list(VISIBILITIES)}, got {self.visibility!r}"
            )
        if self.source not in SOURCES:
            raise InvalidPrefixFile(f"source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.dtype not in DTYPE_NAMES.values():
            raise InvalidPrefixFile(
                f"dtype must be one of {sorted(DTYPE_NAMES.values())}, got {self.dtype!r}"
            )
        if len(self.input_suffix) > 16:
            raise InvalidPrefixFile(
                f"input_suffix must be at most 16 characters, got {len(self.input_suffix)}"
            )
        if BY_NAME[self.kind].positional != (self.prefix_len > 0):
            raise InvalidPrefixFile(
                f"prefix_len must be >= 1 for a prefix_kv prefix and 0 for the other kinds (ntk, lora,"
                f" adapter: they occupy no positions), got {self.prefix_len} for kind {self.kind!r}"
            )
        if len(self.name) > MAX_NAME_LEN:
            raise InvalidPrefixFile(f"name must be at most {MAX_NAME_LEN} characters, got {len(self.name)}")
        texts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "prefix_len"}
        for key, value in texts.items():  # a JSON header may carry lone surrogates; files are UTF-8
            try:
                check_text(value)
            except ValueError as exc:
                raise InvalidPrefixFile(f"metadata {key}: {exc}") from None


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous tensor (any dtype, bf16 included)."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def encode_prefix(kv: torch.Tensor, meta: PrefixMeta) -> bytes:
    """Serialize `kv [n_layer, 2, n_head, P, head_dim]` with its metadata (sha256 filled in here)."""
    return encode_tensors({TENSOR_NAME: kv}, meta)


def encode_tensors(tensors: dict[str, torch.Tensor], meta: PrefixMeta) -> bytes:
    """Serialize a prefix of either kind (see TENSOR_SETS); kind, length, dtype and sha256 are set here."""
    # (a copy each: tensors that share memory, e.g. one array given for two sites, are saved apart)
    tensors = {
        n: t.detach().cpu().clone(memory_format=torch.contiguous_format) for n, t in sorted(tensors.items())
    }
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or not dtypes <= set(DTYPE_NAMES):
        raise InvalidPrefixFile(
            f"prefix tensors must share one dtype of {sorted(DTYPE_NAMES.values())}, "
            f"got {sorted(map(str, dtypes))}"
        )
    kind = kind_with_tensors(tensors)
    if kind is None:
        raise InvalidPrefixFile(f"expected the tensors of one kind {TENSOR_SETS}, got {sorted(tensors)}")
    digest = hashlib.sha256(b"".join(tensor_bytes(t) for t in tensors.values())).hexdigest()
    meta = PrefixMeta(
        **{
            **meta.to_strings(),
            "kind": kind.name,
            "prefix_len": kind.length(kind.from_tensors(tensors)) if kind.positional else 0,
            "dtype": DTYPE_NAMES[dtypes.pop()],
            "sha256": digest,
        }
    )
    meta.check()
    return st_save(tensors, metadata=meta.to_strings())


def _sniff(data: bytes) -> None:
    if not data:
        raise InvalidPrefixFile("file is empty; expected a safetensors file")
    if data[:4] == b"PK\x03\x04":
        raise InvalidPrefixFile(
            "file is a zip archive (e.g. torch.save output); only safetensors is accepted"
        )
    if data[:1] == b"\x80" and len(data) > 1 and 2 <= data[1] <= 5:
        raise InvalidPrefixFile(
            "file is a Python pickle; only safetensors is accepted (pickle is never loaded)"
        )
    if len(data) < 8:
        raise InvalidPrefixFile(
            f"file is {len(data)} bytes; a safetensors file starts with an 8-byte header length"
        )


def parse_header(data: bytes, max_bytes: int, whole: bool = True) -> tuple[dict, int]:
    """Check the safetensors structure; returns (header dict, offset of the data buffer).

    `whole=False`: `data` is only the start of the file (enough for the header, to list metadata),
    so the tensors' offsets are not checked against it.
    """
    if len(data) > max_bytes:
        raise InvalidPrefixFile(f"file is {len(data)} bytes; the limit is {max_bytes}")
    _sniff(data)
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise InvalidPrefixFile(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > len(data):
        raise InvalidPrefixFile(f"header of {n} bytes runs past the end of the {len(data)}-byte file")
    try:
        header = parse_json(data[8 : 8 + n].decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON, or nested too deeply
        raise InvalidPrefixFile(f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidPrefixFile(f"header must be a JSON object, got {type(header).__name__}")
    if whole:
        _check_offsets(header, len(data) - 8 - n)
    return header, 8 + n


def _check_offsets(header: dict, buffer_len: int) -> None:
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        off = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(off, list) and len(off) == 2 and all(type(x) is int for x in off)):  # (no bools)
            raise InvalidPrefixFile(f"tensor {name!r} has no valid data_offsets [begin, end], got {off!r}")
        if not 0 <= off[0] <= off[1] <= buffer_len:
            raise InvalidPrefixFile(
                f"tensor {name!r} data_offsets {off} fall outside the {buffer_len}-byte buffer"
            )
        spans.append((off[0], off[1], name))
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin < end:
            raise InvalidPrefixFile(
                f"tensor {name!r} data_offsets overlap another tensor's (begin {begin} < {end})"
            )
        if begin > end:
            raise InvalidPrefixFile(f"data buffer has a gap before tensor {name!r} ({end}..{begin})")
        end = stop
    if end != buffer_len:
        raise InvalidPrefixFile(f"tensors cover {end} bytes of a {buffer_len}-byte data buffer")


def read_meta(head: bytes) -> PrefixMeta:
    """Metadata only, from the start of a file (for listing); the tensor is not read."""
    return read_listing(head)[0]


def read_listing(head: bytes) -> tuple[PrefixMeta, int]:
    """Metadata and the file's size in bytes, from its start (one header parse; the size is the header
    length + the tensors' extent as the header says, their offsets being checked when the file loads)."""
    header, start = parse_header(head, 8 + MAX_HEADER_BYTES, whole=False)
    ends = [
        info["data_offsets"][1]
        for name, info in header.items()
        if name != "__metadata__" and isinstance(info, dict) and isinstance(info.get("data_offsets"), list)
    ]
    return _meta(header), start + max((e for e in ends if isinstance(e, int)), default=0)


def _meta(header: dict) -> PrefixMeta:
    raw = header.get("__metadata__")
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise InvalidPrefixFile(
            "header has no __metadata__ string map; expected a prefix file written by prefixserve"
        )
    return PrefixMeta.from_strings(raw)


def decode_prefix(data: bytes, expect: Expect) -> tuple[PrefixState, PrefixMeta]:
    """Validate everything, then build the prefix: K/V `[n_layer, 2, n_head, P, head_dim]` or an
    NtkPrefix (low-rank Z multiplied out), on the CPU, and its metadata."""
    tensors, meta = decode_tensors(data, expect)
    return BY_NAME[meta.kind].from_tensors(tensors), meta


def decode_tensors(data: bytes, expect: Expect) -> tuple[dict[str, torch.Tensor], PrefixMeta]:
    """Validate everything, then build the file's tensors (by name) on the CPU."""
    header, start = parse_header(data, expect.max_bytes)
    names = sorted(k for k in header if k != "__metadata__")
    meta = _meta(header)
    allowed = TENSOR_SETS[meta.kind]
    if names not in allowed:
        want = " or ".join(str(a) for a in allowed)
        raise InvalidPrefixFile(
            f"expected exactly the tensor{'s' * (len(allowed[0]) > 1)} {want}, found {names}"
        )
    shapes, dtypes = {}, {}
    for name in names:
        dtype, shape = tensor_layout(header, name)
        if meta.dtype != DTYPE_NAMES[dtype]:
            raise InvalidPrefixFile(
                f"metadata dtype {meta.dtype!r} does not match the tensor's {DTYPE_NAMES[dtype]!r}"
            )
        shapes[name], dtypes[name] = shape, dtype
    kind = BY_NAME[meta.kind]
    kind.check_shapes(shapes, meta.prefix_len, expect)
    if meta.model_fingerprint != expect.fingerprint:
        raise InvalidPrefixFile(
            f"prefix was made for model {meta.model_fingerprint}, but this server runs {expect.fingerprint}"
        )
    raws = {name: tensor_raw(data, header, start, name, dtypes[name], shapes[name]) for name in names}
    if hashlib.sha256(b"".join(raws.values())).hexdigest() != meta.sha256:
        raise InvalidPrefixFile("tensor bytes do not match the sha256 in the metadata (corrupted file)")
    if not all(all_finite(raw, dtypes[n]) for n, raw in raws.items()):
        raise InvalidPrefixFile("prefix contains NaN or Inf values")
    if expect.bounds is not None:
        arrays = {n: as_float32(raw, dtypes[n], shapes[n]) for n, raw in raws.items()}
        kind.check_magnitudes(arrays, expect.bounds)
    return {n: tensor_from_raw(raw, dtypes[n], shapes[n]) for n, raw in raws.items()}, meta


def tensor_layout(header: dict, name: str) -> tuple[torch.dtype, list[int]]:
    """A tensor's dtype (one of DTYPES: float types only) and shape (non-negative integers), from a
    header that `parse_header` has checked; shared by native files and PEFT weights."""
    info = header[name]
    named = info.get("dtype")
    dtype = DTYPES.get(named) if isinstance(named, str) else None  # (a list or an object is no name)
    if dtype is None:
        raise InvalidPrefixFile(f"dtype must be one of {sorted(DTYPES)}, got {info.get('dtype')!r}")
    shape = info.get("shape")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise InvalidPrefixFile(f"shape must be a list of non-negative integers, got {shape!r}")
    return dtype, shape


def tensor_raw(
    data: bytes, header: dict, start: int, name: str, dtype: torch.dtype, shape: list[int]
) -> bytes:
    """A tensor's bytes, once its data_offsets span exactly what its dtype and shape need."""
    begin, end = header[name]["data_offsets"]
    need = math.prod(shape) * dtype.itemsize
    if end - begin != need:
        raise InvalidPrefixFile(
            f"tensor {name!r}: shape {shape} needs {need} bytes, data_offsets give {end - begin}"
        )
    return data[start + begin : start + end]


def tensor_from_raw(raw: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """The tensor built from checked bytes (never a parser: safetensors' or pickle's)."""
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


_EXPONENT = {
    torch.float32: (np.uint32, 0x7F800000),
    torch.bfloat16: (np.uint16, 0x7F80),
    torch.float16: (np.uint16, 0x7C00),
}


def all_finite(raw: bytes, dtype: torch.dtype) -> bool:
    """No NaN/Inf: no value has an all-ones exponent. Plain numpy on the bytes, so a load on a worker
    thread does not compete for torch's intra-op thread pool with the decode loop."""
    uint, mask = _EXPONENT[dtype]
    bits = np.frombuffer(raw, dtype=uint)
    return not bool(((bits & uint(mask)) == uint(mask)).any())


def as_float32(raw: bytes, dtype: torch.dtype, shape: list[int]) -> np.ndarray:
    """Checked bytes as a float32 array (numpy, like `all_finite`; bfloat16 widened through its bits)."""
    if dtype == torch.bfloat16:
        return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    wide = np.frombuffer(raw, dtype=np.float16 if dtype == torch.float16 else np.float32)
    return wide.astype(np.float32, copy=False).reshape(shape)


def check_magnitudes(arrays: dict[str, np.ndarray], bounds: MagnitudeBounds) -> None:
    """Raise InvalidPrefixFile unless every layer's values are within `bounds` (and NTK's k >= 0).
    `arrays`: a file's finite tensors by name, as float32; their kind checks them."""
    kind = kind_with_tensors(arrays)
    if kind is None:
        raise InvalidPrefixFile(f"expected the tensors of one kind {TENSOR_SETS}, got {sorted(arrays)}")
    kind.check_magnitudes(arrays, bounds)
