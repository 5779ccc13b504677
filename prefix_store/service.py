"""PrefixService: the one place that creates, reads, lists and deletes prefixes.

Durable store (truth) -> byte cache (Redis, or in-process) -> device pool (the engine's provider).
Writes go to the store first and are published there atomically; the cache is filled on write and
read through on miss; nothing fails because the cache failed.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .binding import ModelBinding
from .bounds import Expect
from .cache import ByteCache, LocalByteCache, RedisByteCache, Stats
from .errors import PrefixNotFound
from .format import (
    DTYPE_NAMES,
    MAX_HEADER_BYTES,
    TENSOR_NAME,
    InvalidPrefixFile,
    PrefixMeta,
    decode_prefix,
    decode_tensors,
    encode_tensors,
    read_listing,
)
from .importers import PEFT_TENSOR, import_peft, import_peft_lora, peft_type
from .limits import DEFAULT_MAX_PREFIX_LEN, longest_usable_prefix
from .pool import DevicePool
from .redis_health import RedisConfig, RedisHealth
from .state import PrefixState
from .store import DurableStore

log = logging.getLogger(__name__)
Admit = Callable[[int], None]  # called with a new prefix file's size before it is stored; raises to refuse


def new_prefix_id() -> str:
    """A fresh random prefix id (the id an upload gets unless one was planned for it)."""
    return f"pfx-{secrets.token_hex(8)}"


@dataclass(frozen=True)
class StoreConfig:
    url: str = "./data/prefixes"  # a directory or any fsspec URL (s3://bucket/prefixes)
    redis_url: str | None = None  # None: the in-process byte cache (embedded default)
    cache_ttl_s: int = 24 * 3600  # every Redis key expires (volatile-lru beside the job queue)
    redis_timeout_s: float = 0.5  # a slower Redis answer counts as a miss
    redis_backoff_s: float = 2.0  # after a Redis error, go straight to the store for this long
    temp_max_age_s: float = 600.0  # older temp files in the store are leftovers, swept at start-up
    local_cache_bytes: int = 256 * 2**20
    device_pool_bytes: int = 1 * 2**30
    max_file_bytes: int = 64 * 2**20  # uploads are capped before parsing
    max_prefix_len: int = DEFAULT_MAX_PREFIX_LEN
    load_workers: int = 2


class PrefixService:
    def __init__(
        self,
        model: ModelBinding,
        config: StoreConfig | None = None,
        redis_health: RedisHealth | None = None,
    ):
        """`model`: the served model as the store sees it (`prefixserve.compile.bind_model(loaded)`);
        `redis_health`: the process's shared Redis state (built from the config when not given)."""
        self.model = model
        self.config = config or StoreConfig()
        self.stats = Stats()
        self.store = DurableStore(self.config.url)
        self.store.sweep_temp(self.config.temp_max_age_s)
        self.cache: ByteCache = (
            RedisByteCache(
                self.config.redis_url,
                self.config.cache_ttl_s,
                stats=self.stats,
                health=redis_health or RedisHealth(self.redis_config()),
            )
            if self.config.redis_url
            else LocalByteCache(self.config.local_cache_bytes)
        )
        limit = min(  # a stored prefix must leave room for a request (one input and one new token)
            self.config.max_prefix_len,
            longest_usable_prefix(model.spec.n_positions),
        )
        self.expect = Expect(model.spec, model.fingerprint, limit, self.config.max_file_bytes, model.bounds)
        self.pool = DevicePool(
            self.load_state,
            self.length,
            self.config.device_pool_bytes,
            model.device,
            model.dtype,
            self.config.load_workers,
            self.stats,
        )
        self._meta: dict[str, PrefixMeta] = {}  # files are immutable, so metadata is cached forever
        self._size: dict[str, int] = {}  # and so are their sizes in bytes
        self._lock = threading.Lock()

    def redis_config(self) -> RedisConfig | None:
        c = self.config
        return RedisConfig(c.redis_url, c.redis_timeout_s, c.redis_backoff_s) if c.redis_url else None

    # ---- create --------------------------------------------------------------------------------
    def add_tensor(
        self,
        kv: torch.Tensor,
        owner: str,
        name: str = "",
        visibility: str = "private",
        source: str = "upload",
        prefix_id: str | None = None,
        input_suffix: str = "",
        admit: Admit | None = None,
    ) -> PrefixMeta:
        """Validate canonical K/V against the model, store it (under a new id unless `prefix_id` is
        given; an existing id raises PrefixExists), return its metadata."""
        if kv.dim() != 5:
            raise InvalidPrefixFile(
                f"prefix must be [n_layer, 2, n_head, P, head_dim], got shape {list(kv.shape)}"
            )
        return self.add_tensors(
            {TENSOR_NAME: kv}, owner, name, visibility, source, prefix_id, input_suffix, admit
        )

    def add_tensors(
        self,
        tensors: dict[str, torch.Tensor],
        owner: str,
        name: str = "",
        visibility: str = "private",
        source: str = "upload",
        prefix_id: str | None = None,
        input_suffix: str = "",
        admit: Admit | None = None,
    ) -> PrefixMeta:
        """Store a prefix of either kind from its named tensors (format.TENSOR_SETS), validated like
        every load; returns its metadata. `admit(bytes)`: called with the file's size before anything is
        stored, to refuse it (a quota) by raising."""
        tensors = {n: t.detach().cpu() for n, t in tensors.items()}
        tensors = {n: t if t.dtype in DTYPE_NAMES else t.float() for n, t in tensors.items()}
        meta = PrefixMeta(
            id=prefix_id or new_prefix_id(),
            model_fingerprint=self.model.fingerprint,
            prefix_len=0,  # kind, length and dtype are set from the tensors by encode_tensors
            dtype="float32",
            owner=owner,
            name=name,
            visibility=visibility,
            source=source,
            input_suffix=input_suffix,
        )
        data = encode_tensors(tensors, meta)
        _, meta = decode_tensors(data, self.expect)  # the same validation as every load
        if admit is not None:
            admit(len(data))
        self.store.put(meta.id, data)
        self.cache.put(meta.id, data)
        with self._lock:
            self._meta[meta.id] = meta
            self._size[meta.id] = len(data)
        return meta

    def add_file(
        self,
        data: bytes,
        owner: str,
        name: str = "",
        visibility: str = "private",
        prefix_id: str | None = None,
        admit: Admit | None = None,
    ) -> PrefixMeta:
        """A native prefix file (e.g. downloaded from another server running the same model)."""
        tensors, meta = decode_tensors(data, self.expect)
        return self.add_tensors(
            tensors, owner, name or meta.name, visibility, "upload", prefix_id, admit=admit
        )

    def add_peft(
        self,
        config_raw: bytes,
        weights_raw: bytes,
        owner: str,
        name: str = "",
        visibility: str = "private",
        prefix_id: str | None = None,
        admit: Admit | None = None,
    ) -> PrefixMeta:
        """A PEFT adapter: prefix tuning or prompt tuning (-> prefix_kv), or LoRA (-> lora)."""
        if peft_type(config_raw) == "LORA":
            tensors = import_peft_lora(config_raw, weights_raw, self.model, self.config.max_file_bytes)
            return self.add_tensors(tensors, owner, name, visibility, "peft", prefix_id, admit=admit)
        kv = import_peft(
            config_raw, weights_raw, self.model, self.config.max_file_bytes, self.expect.max_prefix_len
        )
        try:
            return self.add_tensor(kv, owner, name, visibility, "peft", prefix_id, admit=admit)
        except InvalidPrefixFile as exc:  # say which uploaded tensor the values came from
            raise InvalidPrefixFile(f"adapter_model {PEFT_TENSOR}, read as {exc}") from None

    def add_text(
        self,
        text: str,
        owner: str,
        name: str = "",
        visibility: str = "private",
        prefix_id: str | None = None,
        admit: Admit | None = None,
    ) -> PrefixMeta:
        kv = self.model.compile_text(text, self.expect.max_prefix_len)
        return self.add_tensor(kv, owner, name, visibility, "text", prefix_id, admit=admit)

    # ---- read ----------------------------------------------------------------------------------
    def cached_meta(self, prefix_id: str) -> PrefixMeta | None:
        """Metadata already read (no I/O: safe on the event loop); None if it would need the store."""
        with self._lock:
            return self._meta.get(prefix_id)

    def meta(self, prefix_id: str) -> PrefixMeta:
        cached = self.cached_meta(prefix_id)
        if cached is not None:
            return cached
        head = self.store.head(prefix_id, 8 + MAX_HEADER_BYTES)
        meta, size = read_listing(head)
        with self._lock:
            self._meta[prefix_id] = meta
            self._size[prefix_id] = size
        return meta

    def size(self, prefix_id: str) -> int | None:
        """The stored file's bytes, once its metadata was read (no I/O); else None."""
        with self._lock:
            return self._size.get(prefix_id)

    def visible(self, prefix_id: str, tenant: str, meta: PrefixMeta | None = None) -> PrefixMeta:
        """Metadata if `tenant` may use the prefix; a foreign private prefix is 'not found' (invariant 8).
        With `meta` given (from `cached_meta`) no I/O happens."""
        meta = meta or self.meta(prefix_id)
        if meta.owner != tenant and meta.visibility != "public":
            raise PrefixNotFound(prefix_id)
        return meta

    def length(self, prefix_id: str) -> int:
        return self.meta(prefix_id).prefix_len

    def owned(self, owner: str) -> tuple[int, int]:
        """How many prefixes `owner` owns, and their files' bytes (disk: the store is listed; each file's
        header is read once per process)."""
        count = size = 0
        for meta in self._all():
            if meta.owner == owner:
                count += 1
                size += self.size(meta.id) or 0
        return count, size

    def _all(self) -> Iterator[PrefixMeta]:
        """Every stored prefix's metadata (an unreadable file is logged and skipped)."""
        for pid in self.store.ids():
            try:
                yield self.meta(pid)
            except Exception as exc:  # one unreadable file must not hide the others
                log.warning("skipping unreadable prefix file %s: %s", pid, exc)

    def list(self, tenant: str) -> list[PrefixMeta]:
        """The tenant's own prefixes and every public one."""
        return [m for m in self._all() if m.owner == tenant or m.visibility == "public"]

    def load_bytes(self, prefix_id: str) -> bytes:
        """Read-through: cache, then the durable store (which refills the cache)."""
        data = self.cache.get(prefix_id)
        if data is not None:
            self.stats.inc(self.cache.tier, "hits")
            return data
        self.stats.inc(self.cache.tier, "misses")
        data = self.store.get(prefix_id)
        self.stats.inc("store", "reads")
        self.cache.put(prefix_id, data)
        return data

    def load_state(self, prefix_id: str) -> PrefixState:
        """The prefix's tensors (K/V or NTK state), validated for the served model, on the CPU."""
        kv, _ = decode_prefix(self.load_bytes(prefix_id), self.expect)
        return kv

    # ---- delete --------------------------------------------------------------------------------
    def delete(self, prefix_id: str) -> bool:
        """Remove from the store (truth) first, then from the cache and the device pool."""
        found = self.store.delete(prefix_id)
        self.store.delete_evaluations(prefix_id)
        self.cache.delete(prefix_id)
        self.pool.evict(prefix_id)
        with self._lock:
            self._meta.pop(prefix_id, None)
            self._size.pop(prefix_id, None)
        return found

    def close(self) -> None:
        self.pool.close()
