"""Server settings: one object, read from `PREFIXSERVE_*` environment variables (see README table)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from prefix_store.service import StoreConfig

from .engine import EngineConfig

ENV_PREFIX = "PREFIXSERVE_"


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
    cache_ttl_s: int = 24 * 3600
    device_pool_bytes: int = 1 << 30
    max_upload_bytes: int = 64 << 20
    max_prefix_len: int = 512
    # engine
    max_running: int = 32
    max_tokens_per_step: int = 512
    max_waiting: int = 256
    max_seq_len: int = 0  # 0: the model's n_positions
    # tenants and limits
    auth: bool = True  # False: one default tenant, no keys (local use; logged as a warning)
    api_keys: str = ""  # "tenant:key,tenant2:key2"
    api_keys_file: str = ""  # JSON {"tenant": ["key", ...]}
    requests_per_minute: int = 0  # per tenant; 0 = unlimited
    tokens_per_minute: int = 0  # per tenant (input + max_new_tokens); 0 = unlimited
    job_reclaim_s: float = 60.0  # a job whose worker is silent this long is handed to another worker
    request_timeout_s: float = 300.0
    shutdown_grace_s: float = 30.0

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
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ValueError(
                        f"{ENV_PREFIX}{f.name.upper()}: expected {kind.__name__}, got {raw!r}"
                    ) from None
        values.update(overrides)
        return cls(**values)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_running=self.max_running,
            max_tokens_per_step=self.max_tokens_per_step,
            max_waiting=self.max_waiting,
            max_seq_len=self.max_seq_len or None,
        )

    def store_config(self) -> StoreConfig:
        return StoreConfig(
            url=self.store_url or os.path.join(self.data_dir, "prefixes"),
            redis_url=self.redis_url or None,
            cache_ttl_s=self.cache_ttl_s,
            device_pool_bytes=self.device_pool_bytes,
            max_file_bytes=self.max_upload_bytes,
            max_prefix_len=self.max_prefix_len,
        )
