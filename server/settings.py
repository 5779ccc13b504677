"""Server settings: one object, read from `PREFIXSERVE_*` environment variables (docs/settings.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from prefix_store.limits import longest_usable_prefix
from prefix_store.redis_health import RedisConfig
from prefix_store.service import StoreConfig

from .limits import DEFAULT_MAX_PREFIX_LEN
from .protocol import ConnectionLimits
from .tenants import LIMIT_NAMES, Limits, parse_config_keys

ENV_PREFIX = "PREFIXSERVE_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerSettings:
    # hub id or directory; "tiny": the offline tiny model (built under data_dir); "auto": gpt2 from the
    # hub, or the tiny model when the hub cannot be reached (logged as a warning)
    model: str = "auto"
    dtype: str = "float32"
    device: str = "cpu"
    data_dir: str = "./data"
    host: str = "127.0.0.1"
    port: int = 8000
    # store
    store_url: str = ""  # default: <data_dir>/prefixes
    redis_url: str = ""  # empty: in-process cache (embedded default)
    redis_timeout_s: float = 0.5  # connect/read timeout of every Redis call (cache, limits, jobs)
    redis_retry_s: float = 2.0  # after a Redis failure it is skipped this long, then probed again
    cache_ttl_s: int = 24 * 3600
    device_pool_bytes: int = 1 << 30
    max_upload_bytes: int = 64 << 20
    max_prefix_len: int = DEFAULT_MAX_PREFIX_LEN
    # engine
    max_running: int = 0  # rows per batch; 0: 256 on CUDA, 64 on CPU
    max_tokens_per_step: int = 0  # 0: max(512, max_running)
    max_waiting: int = 256
    max_seq_len: int = 0  # 0: the model's n_positions
    kv_cache_tokens: int = 0  # paged KV pool of the rows' own tokens; 0: max_running * max_seq_len / 2
    kv_block_size: int = 16  # tokens per KV block
    cuda_graphs: bool = True  # on CUDA, each layer's dense part replays as CUDA graphs; false: eager
    # on the CPU, the dense layers also packed for oneDNN's GEMM (decode steps; one more copy of them)
    cpu_packed: bool = True
    # the engine's CPU threads: 0: as many as the cores other processes leave free, re-fitted every
    # half second (a team wider than the free cores stalls at every barrier); n: always n
    cpu_threads: int = 0
    quantize: str = ""  # "int8": int8 GEMMs for every dense layer (float32 on an x86 CPU); empty: none
    # the engine core runs in its own process (API processes talk to it over ZeroMQ); false: on a thread
    # of the API process (one process, as embedding it in Python does)
    engine_process: bool = True
    engine_address: str = ""  # connect to this running engine (ipc:// or tcp://) instead of starting one
    api_workers: int = 1  # API processes on one engine (more than 1 needs PREFIXSERVE_REDIS_URL)
    # scale-out on Ray Serve (`prefixserve serve --ray`; the [ray] extra)
    ray_address: str = ""  # a Ray cluster to join ("auto": the local one); empty: start one here
    ray_replicas: int = 2  # engine replicas (the minimum, when autoscaling)
    ray_max_replicas: int = 0  # > ray_replicas: autoscale up to this many on ongoing requests
    ray_target_ongoing_requests: int = 64  # autoscaling target per engine replica
    ray_max_ongoing_requests: int = 320  # per engine replica; more wait in Ray (default: batch + queue)
    ray_gpus_per_replica: float = -1.0  # -1: 1 on CUDA, 0 on the CPU
    ray_cpus_per_replica: float = 1.0
    ray_api_replicas: int = 1  # ingress replicas (HTTP, tokenization, SSE)
    # "affinity": a request goes to a replica holding its prefix (Ray Serve's multiplexed model id);
    # "random": each replica its own deployment, the ingress picks one at random (the baseline that
    # bench/scale.py measures affinity against)
    ray_routing: str = "affinity"
    replica_prefixes: int = 0  # prefixes an engine replica holds (Ray's models per replica); 0: as many
    # of the longest allowed prefix as the device pool's bytes hold
    # tenants and limits
    # "auto": on exactly when API keys are configured, an admin key is set or the tenant registry holds
    # issued keys; "false": one default tenant, no keys (local use; logged as a warning); "true": keys
    # required even when none are configured (everything 401s)
    auth: str | bool = "auto"
    api_keys: str = ""  # "tenant:key,tenant2:key2" (config keys; the registry issues more at run time)
    api_keys_file: str = ""  # JSON {"tenant": ["key", ...]}
    admin_key: str = ""  # the key of the /admin API (tenants, keys, usage); empty: no admin API
    admin_key_file: str = ""  # a file holding the admin key (instead of admin_key)
    registry_refresh_s: float = 1.0  # how often each process checks Redis for tenant and key changes
    # every tenant's limits unless its registry record overrides them (0 = unlimited)
    requests_per_minute: int = 0
    tokens_per_minute: int = 0  # input + max_new_tokens of its requests
    max_concurrent: int = 0  # its generation requests in the engine at once (waiting + running)
    max_stored_prefixes: int = 0  # prefixes it owns (its queued training jobs count too)
    max_stored_bytes: int = 0  # bytes of the prefix files it owns
    max_active_jobs: int = 0  # its training and evaluation jobs queued or running
    usage_flush_s: float = 1.0  # usage counts are written to Redis (or the store) at least this often
    job_reclaim_s: float = 60.0  # a job whose worker is silent this long is handed to another worker
    job_progress_s: float = 1.0  # a running job's progress (step, loss, ETA) is saved at most this often
    request_timeout_s: float = 300.0
    shutdown_grace_s: float = 30.0
    # connections (server/protocol.py): a client slower than this is cut off with 408
    client_header_timeout_s: float = 10.0  # connect (or a keep-alive request's first byte) -> headers end
    client_body_timeout_s: float = 15.0  # each window of this length must bring body bytes ...
    client_body_min_bytes_per_s: int = 500  # ... at least this rate times the window (and at least 1)
    # /metrics: with a key, only `Authorization: Bearer <metrics_key>` reads it; without one, and with
    # auth on, only loopback clients do. Tenant labels are pseudonyms unless metrics_tenant_labels
    metrics_key: str = ""
    metrics_tenant_labels: bool = False
    # POST /prefixes with an Idempotency-Key: the first answer is replayed for this long
    idempotency_ttl_s: float = 24 * 3600.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> ServerSettings:
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            kind = type(f.default)
            if kind is bool:
                values[f.name] = raw.strip().lower() in TRUE
            else:
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ValueError(
                        f"{ENV_PREFIX}{f.name.upper()}: expected {kind.__name__}, got {raw!r}"
                    ) from None
        values.update(overrides)
        return cls(**values)

    @property
    def auth_enabled(self) -> bool:
        """Whether authentication is on by the settings alone (keys issued earlier and found in the
        registry turn it on too, `prefixserve.auth.Authenticator.enabled`)."""
        value = str(self.auth).strip().lower()
        if value == "auto":
            return bool(self.api_keys.strip() or self.api_keys_file or self.admin_key or self.admin_key_file)
        if value in TRUE + FALSE:
            return value in TRUE
        raise ValueError(f"{ENV_PREFIX}AUTH: expected auto, true or false, got {self.auth!r}")

    def check_exposure(self) -> None:
        """Refuse to serve without authentication beyond loopback unless that was asked for explicitly."""
        explicit = str(self.auth).strip().lower() in FALSE
        if not self.auth_enabled and not explicit and self.host not in LOOPBACK:
            raise SystemExit(
                f"refusing to serve on {self.host} without authentication: no API keys are configured."
                f" Set {ENV_PREFIX}API_KEYS (or _API_KEYS_FILE) or {ENV_PREFIX}ADMIN_KEY, or"
                f" {ENV_PREFIX}AUTH=false to allow it."
            )

    def tenant_limits(self) -> Limits:
        """Every tenant's limits unless its registry record overrides them."""
        return Limits(**{name: getattr(self, name) for name in LIMIT_NAMES})

    def admin_secret(self) -> str:
        """The admin key: `admin_key`, or the first line of `admin_key_file` ("" when neither is set)."""
        if self.admin_key or not self.admin_key_file:
            return self.admin_key
        return Path(self.admin_key_file).read_text().strip()

    def config_keys(self) -> dict[str, list[str]]:
        """The API keys configured by `api_keys` and `api_keys_file`, by tenant."""
        text = Path(self.api_keys_file).read_text() if self.api_keys_file else None
        return parse_config_keys(self.api_keys, text)

    def redis_config(self) -> RedisConfig | None:
        """The one Redis configuration every client of the process is built from (None: no Redis)."""
        if not self.redis_url:
            return None
        return RedisConfig(self.redis_url, self.redis_timeout_s, self.redis_retry_s)

    def store_config(self) -> StoreConfig:
        return StoreConfig(
            url=self.store_url or os.path.join(self.data_dir, "prefixes"),
            redis_url=self.redis_url or None,
            redis_timeout_s=self.redis_timeout_s,
            redis_backoff_s=self.redis_retry_s,
            cache_ttl_s=self.cache_ttl_s,
            device_pool_bytes=self.device_pool_bytes,
            max_file_bytes=self.max_upload_bytes,
            # the service also caps it by the model's n_positions; a smaller engine slot caps it here
            max_prefix_len=min(self.max_prefix_len, longest_usable_prefix(self.max_seq_len))
            if self.max_seq_len
            else self.max_prefix_len,
        )

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            header_timeout_s=self.client_header_timeout_s,
            body_timeout_s=self.client_body_timeout_s,
            body_min_bytes_per_s=self.client_body_min_bytes_per_s,
        )
