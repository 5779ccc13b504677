"""API keys -> tenants. Keys are kept only as sha256 digests and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from pathlib import Path

from .errors import PrefixServeError
from .limits import TENANT_NAME_MAX

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"


class Unauthorized(PrefixServeError):
    kind = "unauthorized"
    status = 401


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Tenants:
    def __init__(self, keys: dict[str, list[str]], enabled: bool = True) -> None:
        self.enabled = enabled
        self._digests: list[tuple[bytes, str]] = []
        for tenant, tenant_keys in keys.items():
            if not tenant or len(tenant) > TENANT_NAME_MAX:
                raise ValueError(f"tenant names must be 1-{TENANT_NAME_MAX} characters, got {tenant!r}")
            for key in tenant_keys:
                if len(key) < 16:
                    raise ValueError(f"API keys must be at least 16 characters (tenant {tenant!r})")
                self._digests.append((_digest(key), tenant))
        if not enabled:
            log.warning(
                "authentication is OFF: every request runs as tenant %r (local use only)", DEFAULT_TENANT
            )
        elif not self._digests:
            log.warning("authentication is on but no API keys are configured: every request will get 401")
        else:
            tenants = len({t for _, t in self._digests})
            log.info("authentication is on: %d API keys for %d tenants", len(self._digests), tenants)

    @classmethod
    def from_settings(cls, api_keys: str, api_keys_file: str, enabled: bool) -> Tenants:
        """`api_keys` is "tenant:key,tenant:key"; `api_keys_file` is JSON {"tenant": ["key", ...]}."""
        keys: dict[str, list[str]] = {}
        for item in filter(None, (s.strip() for s in api_keys.split(","))):
            tenant, sep, key = item.partition(":")
            if not sep:
                raise ValueError("PREFIXSERVE_API_KEYS entries must look like tenant:key")
            keys.setdefault(tenant.strip(), []).append(key.strip())
        if api_keys_file:
            data = json.loads(Path(api_keys_file).read_text())
            if not isinstance(data, dict):
                raise ValueError(f"{api_keys_file}: expected a JSON object of tenant -> [keys]")
            for tenant, tenant_keys in data.items():
                keys.setdefault(tenant, []).extend(
                    [tenant_keys] if isinstance(tenant_keys, str) else tenant_keys
                )
        return cls(keys, enabled)

    def authenticate(self, authorization: str | None) -> str:
        """The tenant for an `Authorization: Bearer <key>` header; Unauthorized otherwise."""
        if not self.enabled:
            return DEFAULT_TENANT
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = _digest(key.strip())
        found = None
        for known, tenant in self._digests:  # every digest is compared: no early exit on a match
            if hmac.compare_digest(known, digest):
                found = tenant
        if found is None:
            raise Unauthorized("invalid API key")
        return found
