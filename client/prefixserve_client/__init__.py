"""Python SDK for a prefixserve server: many prefix-tuning prefixes on one frozen GPT-2.

    from prefixserve_client import Client
    client = Client("http://localhost:8000", api_key="sk-...")
    prefix = client.prefixes.from_text("Answer in one short sentence.\\n")
    print(client.generate(prefix.id, "What is prefix tuning?").text)

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
    ServerError,
    Timeout,
    ValidationError,
)
from ._models import Alternative, Evaluation, GenerateResult, JobState, Prefix, ScoreResult, TokenScore, Usage

__all__ = [
    "Alternative",
    "AsyncClient",
    "AsyncJob",
    "AuthenticationError",
    "Client",
    "Evaluation",
    "GenerateResult",
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
    "ScoreResult",
    "ServerError",
    "Timeout",
    "TokenScore",
    "Usage",
    "ValidationError",
]
