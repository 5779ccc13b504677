"""The tenant registry: tenants, their weights, limits and API keys as live data.

Records live in the durable store, the truth (`tenants/t<sha256 of the name>.json` and
`keys/<key id>.json`, each replaced atomically), so they survive any Redis fault. Every process holds an
immutable snapshot of them in memory: authenticating a request is one SHA-256 and two dict lookups,
never a scan of every key (a key carries its public id: `psk-<key id>-<secret>`).

Propagation: with Redis, every write sets `prefixserve:registry:version` to a fresh random token, and
each process reads that token every `refresh_s` (on its event loop, through `RedisHealth`) and reloads
its snapshot from the store when it changed; so a revoked key or a disabled tenant is refused by every
replica within about `refresh_s` plus one store read, with no restart. A flushed Redis changes the token
too (it is gone), so nothing is missed. While Redis is unavailable each process reloads from the store
every `DEGRADED_RELOAD_S` instead, and every `FULL_RELOAD_S` anyway (a write whose token was lost).
Without Redis (the embedded default: one process) a write updates this process's snapshot at once.

Keys configured with `PREFIXSERVE_API_KEYS` / `_FILE` keep working: they are config keys of implicit
tenants (no record until an admin changes one: a weight, limits, a status, a new key). Only the SHA-256
of any key is kept; a new key is shown once, when it is issued.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from prefix_store.redis_health import RedisHealth, RedisUnavailable
from prefix_store.store import DurableStore, PrefixExists

from .errors import InvalidRequest, PrefixServeError
from .limits import TENANT_NAME_MAX

log = logging.getLogger(__name__)

VERSION_KEY = "prefixserve:registry:version"
TENANTS, KEYS = "tenants", "keys"  # record kinds in the durable store
KEY_PREFIX = "psk-"
KEY_ID = re.compile(r"^[0-9a-f]{16}$")
TENANT_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._@-]{{0,{TENANT_NAME_MAX - 1}}}$")
STATUSES = ("active", "disabled")
MAX_WEIGHT = 1000.0
DEGRADED_RELOAD_S = 5.0  # while Redis is unavailable: reload from the store this often
FULL_RELOAD_S = 30.0  # with Redis: reload this often even when the version did not change


@dataclass(frozen=True)
class Limits:
    """A tenant's quotas and rate limits (0: unlimited). The server's defaults are one of these
    (`ServerSettings.tenant_limits`); a tenant's record overrides some of them."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0  # input + max_new_tokens of its requests
    max_concurrent: int = 0  # its generation requests in the engine at once (waiting + running)
    max_stored_prefixes: int = 0  # prefixes it owns in the store (training jobs queued count too)
    max_stored_bytes: int = 0  # bytes of those prefixes' files
    max_active_jobs: int = 0  # its training and evaluation jobs queued or running


LIMIT_NAMES = tuple(f.name for f in fields(Limits))


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    status: str = "active"
    weight: float = 1.0
    limits: dict[str, int] = field(default_factory=dict)  # overrides of the server's defaults
    created_at: str = ""
    updated_at: str = ""
    source: str = "registry"  # "config": known only from configured keys (no record yet)

    @property
    def active(self) -> bool:
        return self.status == "active"

    def resolved(self, defaults: Limits) -> Limits:
        """Its limits: its own overrides over the server's defaults."""
        return replace(defaults, **self.limits)

    def to_json(self) -> bytes:
        record = {k: v for k, v in asdict(self).items() if k != "source"}
        return json.dumps(record).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Tenant:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str
    digest: str  # sha256 hex of the whole key
    name: str = ""
    created_at: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ApiKey:
        return cls(**json.loads(raw))


class TenantExists(PrefixServeError):
    kind = "conflict"
    status = 409


class TenantNotFound(PrefixServeError):
    kind = "tenant_not_found"
    status = 404

    def __init__(self, name: str) -> None:
        super().__init__(f"tenant {name!r} not found")


class KeyNotFound(PrefixServeError):
    kind = "key_not_found"
    status = 404

    def __init__(self, tenant: str, key_id: str) -> None:
        super().__init__(f"tenant {tenant!r} has no API key with id {key_id!r}")


@dataclass(frozen=True)
class Snapshot:
    """Everything the registry knows, at one moment (never changed: a reload builds a new one)."""

    tenants: MappingProxyType  # name -> Tenant (records)
    keys: MappingProxyType  # key id -> ApiKey
    config_keys: MappingProxyType  # sha256 hex -> tenant name (configured keys)
    config_tenants: frozenset[str]  # the tenants of the configured keys

    def tenant(self, name: str) -> Tenant | None:
        found = self.tenants.get(name)
        if found is None and name in self.config_tenants:
            found = Tenant(name, source="config")
        return found


def parse_config_keys(api_keys: str, api_keys_file_text: str | None) -> dict[str, list[str]]:
    """`api_keys` is "tenant:key,tenant:key"; the file text is JSON {"tenant": ["key", ...]}."""
    keys: dict[str, list[str]] = {}
    for item in filter(None, (s.strip() for s in api_keys.split(","))):
        tenant, sep, key = item.partition(":")
        if not sep:
            raise ValueError("PREFIXSERVE_API_KEYS entries must look like tenant:key")
        keys.setdefault(tenant.strip(), []).append(key.strip())
    if api_keys_file_text:
        data = json.loads(api_keys_file_text)
        if not isinstance(data, dict):
            raise ValueError("the API keys file: expected a JSON object of tenant -> [keys]")
        for tenant, tenant_keys in data.items():
            keys.setdefault(tenant, []).extend([tenant_keys] if isinstance(tenant_keys, str) else tenant_keys)
    for tenant, tenant_keys in keys.items():
        if not tenant or len(tenant) > TENANT_NAME_MAX:
            raise ValueError(f"tenant names must be 1-{TENANT_NAME_MAX} characters, got {tenant!r}")
        if any(len(k) < 16 for k in tenant_keys):
            raise ValueError(f"API keys must be at least 16 characters (tenant {tenant!r})")
    return keys


class TenantRegistry:
    """The registry of one process (see the module docstring). Reads are lock-free (one snapshot
    attribute); writes touch the disk: call them on a thread."""

    def __init__(
        self,
        store: DurableStore,
        config_keys: dict[str, list[str]] | None = None,
        health: RedisHealth | None = None,
        refresh_s: float = 1.0,
    ) -> None:
        self.store, self.health, self.refresh_s = store, health, refresh_s
        self._config = MappingProxyType({digest(k): t for t, ks in (config_keys or {}).items() for k in ks})
        self._redis = health.config.client() if health is not None else None
        self._version: bytes | None = None
        self._reloading = threading.Lock()  # one reload at a time: an older one never lands last
        self.snapshot = self._snapshot({}, {})
        self.reloads = 0

    # ---- reading -------------------------------------------------------------------------------
    def tenant(self, name: str) -> Tenant | None:
        """A tenant by name: its record, or an implicit one for configured keys; None if unknown."""
        return self.snapshot.tenant(name)

    def tenants(self) -> list[Tenant]:
        """Every known tenant, by name."""
        snap = self.snapshot
        names = set(snap.tenants) | snap.config_tenants
        return [snap.tenant(n) for n in sorted(names)]

    def keys_of(self, tenant: str) -> list[ApiKey]:
        return sorted(
            (k for k in self.snapshot.keys.values() if k.tenant == tenant), key=lambda k: k.created_at
        )

    def config_keys_of(self, tenant: str) -> int:
        return sum(1 for t in self.snapshot.config_keys.values() if t == tenant)

    @property
    def has_keys(self) -> bool:
        return bool(self.snapshot.keys or self.snapshot.config_keys)

    def lookup(self, key: str) -> str | None:
        """The tenant a presented key belongs to, or None: an issued key by its id (one hash compared in
        constant time), a configured one by its digest."""
        snap, hashed = self.snapshot, digest(key)
        if key.startswith(KEY_PREFIX) and len(key) > len(KEY_PREFIX) + 17:
            record = snap.keys.get(key[len(KEY_PREFIX) : len(KEY_PREFIX) + 16])
            if record is not None and hmac.compare_digest(record.digest, hashed):
                return record.tenant
        return snap.config_keys.get(hashed)

    # ---- writing (disk: on a thread) -----------------------------------------------------------
    def create(
        self, name: str, status: str = "active", weight: float = 1.0, limits: dict | None = None
    ) -> Tenant:
        check_name(name)
        stamp = now()
        tenant = Tenant(
            name, check_status(status), check_weight(weight), check_limits(limits or {}), stamp, stamp
        )
        try:
            self.store.put_record(TENANTS, record_name(name), tenant.to_json())
        except PrefixExists:
            raise TenantExists(f"tenant {name!r} already exists") from None
        self._changed()
        return tenant

    def update(
        self,
        name: str,
        status: str | None = None,
        weight: float | None = None,
        limits: dict[str, int | None] | None = None,
    ) -> Tenant:
        """Change a tenant (a configured one gets its record now). `limits`: the named ones only; a
        null resets one to the server's default."""
        tenant = self._current(name)
        merged = dict(tenant.limits)
        for key, value in (limits or {}).items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        tenant = replace(
            tenant,
            status=check_status(status) if status is not None else tenant.status,
            weight=check_weight(weight) if weight is not None else tenant.weight,
            limits=check_limits(merged),
            created_at=tenant.created_at or now(),
            updated_at=now(),
            source="registry",
        )
        self.store.put_record(TENANTS, record_name(name), tenant.to_json(), replace=True)
        self._changed()
        return tenant

    def issue_key(self, tenant: str, name: str = "") -> tuple[ApiKey, str]:
        """A new key for the tenant: (its record, the key itself, which is never stored)."""
        current = self._current(tenant)
        if current.source == "config":  # its first issued key makes it a registry tenant
            self.update(tenant)
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        key = f"{KEY_PREFIX}{key_id}-{secret}"
        record = ApiKey(key_id, tenant, digest(key), name, now())
        self.store.put_record(KEYS, key_id, record.to_json())
        self._changed()
        return record, key

    def revoke_key(self, tenant: str, key_id: str) -> None:
        record = self._read_key(key_id) if KEY_ID.match(key_id) else None
        if record is None or record.tenant != tenant:
            raise KeyNotFound(tenant, key_id)
        self.store.delete_record(KEYS, key_id)
        self._changed()

    def _current(self, name: str) -> Tenant:
        """The tenant as the store has it now (not the snapshot: another replica may have written)."""
        raw = self.store.get_record(TENANTS, record_name(name))
        if raw is not None:
            return Tenant.from_json(raw)
        if name in self.snapshot.config_tenants:
            return Tenant(name, source="config")
        raise TenantNotFound(name)

    def _read_key(self, key_id: str) -> ApiKey | None:
        raw = self.store.get_record(KEYS, key_id)
        return ApiKey.from_json(raw) if raw is not None else None

    def _changed(self) -> None:
        """After a write: this process reloads now; the others see a new version token."""
        self.reload()
        if self._redis is not None:
            token = secrets.token_hex(8)
            try:
                self.health.run("announcing a tenant change", lambda: self._redis.set(VERSION_KEY, token))
            except RedisUnavailable:  # the others find it at their next degraded or full reload
                log.warning(
                    "a tenant change could not be announced in Redis; the other replicas see it within %ss",
                    FULL_RELOAD_S,
                )

    # ---- loading and propagation ---------------------------------------------------------------
    def reload(self) -> None:
        """Read every record from the store and swap in the new snapshot (disk: on a thread)."""
        with self._reloading:
            self.snapshot = self._read()
            self.reloads += 1

    def _snapshot(self, tenants: dict[str, Tenant], keys: dict[str, ApiKey]) -> Snapshot:
        config = self._config
        return Snapshot(MappingProxyType(tenants), MappingProxyType(keys), config, frozenset(config.values()))

    def _read(self) -> Snapshot:
        tenants: dict[str, Tenant] = {}
        for name in self.store.record_names(TENANTS):
            with _skipping("tenant", name):
                raw = self.store.get_record(TENANTS, name)
                if raw is not None:
                    tenant = Tenant.from_json(raw)
                    tenants[tenant.name] = tenant
        keys: dict[str, ApiKey] = {}
        for key_id in self.store.record_names(KEYS):
            with _skipping("key", key_id):
                record = self._read_key(key_id)
                if record is not None:
                    keys[record.key_id] = record
        return self._snapshot(tenants, keys)

    async def watch(self, stop: asyncio.Event) -> None:
        """Keep the snapshot current until `stop` is set (see the module docstring). A task on the event
        loop: the version read is asyncio, the reload runs on a thread."""
        if self.health is None:
            return
        client = self.health.config.async_client()
        last_full = time.monotonic()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.refresh_s)
                if stop.is_set():
                    return
                due = await self._reload_due(client, time.monotonic() - last_full)
                if due:
                    try:
                        await asyncio.to_thread(self.reload)
                        last_full = time.monotonic()
                    except Exception as exc:  # the store is down: keep the last snapshot, try again
                        log.warning("reloading the tenant registry failed (%s); keeping the last one", exc)
        finally:
            await client.aclose()

    async def _reload_due(self, client: Any, since_full: float) -> bool:
        try:
            version = await self.health.arun(
                "reading the tenant registry's version", lambda: client.get(VERSION_KEY)
            )
        except RedisUnavailable:
            return since_full >= DEGRADED_RELOAD_S
        changed, self._version = version != self._version, version
        return changed or since_full >= FULL_RELOAD_S


@contextlib.contextmanager
def _skipping(what: str, name: str):
    """One unreadable record must not hide the others (it is logged)."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("skipping the unreadable %s record %s: %s", what, name, exc)


def record_name(tenant: str) -> str:
    """A tenant's record name: names may hold characters a file name may not."""
    return "t" + hashlib.sha256(tenant.encode()).hexdigest()[:32]


# ---- validation (InvalidRequest: 422 naming the field) ----------------------------------------------
def check_name(name: object) -> str:
    if not isinstance(name, str) or not TENANT_NAME.match(name):
        raise InvalidRequest(
            "name",
            f"expected 1-{TENANT_NAME_MAX} characters: letters, digits, '.', '_', '@', '-' (not first),"
            f" got {name!r}",
        )
    return name


def check_status(status: object) -> str:
    if status not in STATUSES:
        raise InvalidRequest("status", f"expected one of {', '.join(STATUSES)}, got {status!r}")
    return str(status)


def check_weight(weight: object) -> float:
    ok = isinstance(weight, int | float) and not isinstance(weight, bool)
    if not ok or not math.isfinite(weight) or not 0 < weight <= MAX_WEIGHT:
        raise InvalidRequest("weight", f"expected a number in (0, {MAX_WEIGHT:g}], got {weight!r}")
    return float(weight)


def check_limits(limits: object) -> dict[str, int]:
    if not isinstance(limits, dict):
        raise InvalidRequest("limits", f"expected an object of {', '.join(LIMIT_NAMES)}, got {limits!r}")
    for key, value in limits.items():
        if key not in LIMIT_NAMES:
            raise InvalidRequest(f"limits.{key}", f"unknown limit; expected one of {', '.join(LIMIT_NAMES)}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidRequest(f"limits.{key}", f"expected an integer >= 0 (0: unlimited), got {value!r}")
    return dict(limits)
