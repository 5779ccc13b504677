"""Python SDK for a prefixserve server: many prefix-tuning prefixes on one frozen GPT-2.

    from prefixserve_client import Client
    client = Client("http://localhost:8000", api_key="sk-...")
    prefix = client.prefixes.from_text("Answer in one short sentence.\\n")
    print(client.generate(prefix.id, "What is prefix tuning?").text)
    print(client.usage(days=7).totals)                     # your own usage

    admin = Client("http://localhost:8000", api_key=ADMIN_KEY)   # the server's PREFIXSERVE_ADMIN_KEY
    admin.admin.tenants.create("acme", weight=2.0, limits={"requests_per_minute": 600})
    print(admin.admin.keys.issue("acme", name="ci").key)   # shown only this once

Installable on its own (`pip install ./client`): httpx and pydantic only, no torch.
"""

from ._client import AsyncClient, AsyncJob, Client, Job, JobFailed
from ._errors import (
    AuthenticationError,
    JobNotFound,
    NotFound,
    Overloaded,
    PermissionDenied,
    PrefixNotFound,
    PrefixServeError,
    QuotaExceeded,
    ServerError,
    StorageQuotaExceeded,
    Timeout,
    TransientQuotaExceeded,
    ValidationError,
)
from ._models import (
    Alternative,
    ApiKey,
    Evaluation,
    GenerateResult,
    IssuedKey,
    JobState,
    Prefix,
    ScoreResult,
    StoredUsage,
    Tenant,
    TokenScore,
    Usage,
    UsageDay,
    UsageReport,
)

__all__ = [
    "Alternative",
    "ApiKey",
    "AsyncClient",
    "AsyncJob",
    "AuthenticationError",
    "Client",
    "Evaluation",
    "GenerateResult",
    "IssuedKey",
    "Job",
    "JobFailed",
    "JobNotFound",
    "JobState",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "Prefix",
    "PrefixNotFound",
    "PrefixServeError",
    "QuotaExceeded",
    "ScoreResult",
    "ServerError",
    "StorageQuotaExceeded",
    "StoredUsage",
    "Tenant",
    "Timeout",
    "TokenScore",
    "TransientQuotaExceeded",
    "Usage",
    "UsageDay",
    "UsageReport",
    "ValidationError",
]
