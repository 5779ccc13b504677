"""Who is calling: an API key -> its tenant (tenants.py keeps the keys), or the admin key.

Authentication is on exactly when it can mean something (`PREFIXSERVE_AUTH=auto`, the default): when
keys are configured (`PREFIXSERVE_API_KEYS` / `_FILE`), an admin key is set, or the registry holds
issued keys. Off, every request runs as the `default` tenant (local use; logged at start-up). Only
SHA-256 digests of keys are kept and compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from .errors import PrefixServeError
from .tenants import Tenant, TenantRegistry

log = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
MIN_ADMIN_KEY = 16


class Unauthorized(PrefixServeError):
    kind = "unauthorized"
    status = 401


class AuthForbidden(PrefixServeError):
    kind = "forbidden"
    status = 403


def bearer(authorization: str | None, what: str = "API key") -> str:
    """The key of an `Authorization: Bearer <key>` header; Unauthorized otherwise."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(f"missing {what}: send 'Authorization: Bearer <key>'")
    return key.strip()


class Authenticator:
    def __init__(self, registry: TenantRegistry, mode: str | bool = "auto", admin_key: str = "") -> None:
        """`mode`: "auto", true or false (ServerSettings.auth); `admin_key`: empty: no admin API."""
        if admin_key and len(admin_key) < MIN_ADMIN_KEY:
            raise ValueError(f"the admin key must be at least {MIN_ADMIN_KEY} characters")
        self.registry = registry
        self.mode = str(mode).strip().lower()
        self._admin = hashlib.sha256(admin_key.encode()).digest() if admin_key else b""

    @property
    def enabled(self) -> bool:
        if self.mode == "auto":
            return bool(self._admin) or self.registry.has_keys
        return self.mode in ("1", "true", "yes", "on")

    @property
    def admin_enabled(self) -> bool:
        return bool(self._admin)

    def log_mode(self) -> None:
        if not self.enabled:
            log.warning(
                "authentication is OFF: every request runs as tenant %r (local use only)", DEFAULT_TENANT
            )
        elif not self.registry.has_keys:
            log.warning("authentication is on but no tenant has an API key yet: tenant calls get 401")
        else:
            log.info("authentication is on: %d tenants known", len(self.registry.tenants()))

    def tenant(self, authorization: str | None) -> Tenant:
        """The calling tenant (401: no key, or an unknown or revoked one; 403: a disabled tenant, or the
        admin key, which is for /admin calls only)."""
        if not self.enabled:
            return self.registry.tenant(DEFAULT_TENANT) or Tenant(DEFAULT_TENANT, source="config")
        key = bearer(authorization)
        name = self.registry.lookup(key)
        if name is None:
            if self.is_admin(key):
                raise AuthForbidden(
                    "this is the admin key: it is for /admin calls; use a tenant's API key here"
                )
            raise Unauthorized("invalid API key (unknown or revoked)")
        tenant = self.registry.tenant(name)
        if tenant is None:  # a key record whose tenant record is gone: refuse, do not guess
            raise Unauthorized("invalid API key (its tenant is unknown)")
        if not tenant.active:
            raise AuthForbidden(f"tenant {name!r} is disabled; ask the server's operator")
        return tenant

    def admin(self, authorization: str | None) -> None:
        """Return for the admin key; 403 when there is no admin API or a tenant's key was sent, 401
        otherwise."""
        if not self._admin:
            raise AuthForbidden("the admin API is off: the server has no admin key (PREFIXSERVE_ADMIN_KEY)")
        key = bearer(authorization, "admin key")
        if self.is_admin(key):
            return
        if self.registry.lookup(key) is not None:
            raise AuthForbidden("admin calls need the admin key, not a tenant's API key")
        raise Unauthorized("invalid admin key")

    def is_admin(self, key: str) -> bool:
        return bool(self._admin) and hmac.compare_digest(hashlib.sha256(key.encode()).digest(), self._admin)
