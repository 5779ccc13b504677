"""`Client` and `AsyncClient`: the same calls, sync and async.

Request building, response parsing, retry timing and SSE parsing are shared pure functions; the two
clients differ only in how they do I/O.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from ._errors import PrefixServeError, ServerError, Timeout, error_for
from ._models import (
    ApiKey,
    GenerateResult,
    IssuedKey,
    JobState,
    Prefix,
    ScoreResult,
    Tenant,
    UsageDay,
    UsageReport,
)
from ._plot import sparkline

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# What an SSE `error` event's type would have answered as a plain HTTP error (the stream had begun).
SSE_ERROR_STATUS = {"unavailable": 503, "prefix_error": 422, "timeout": 504}
ENV_API_KEY = "PREFIXSERVE_API_KEY"
ENV_BASE_URL = "PREFIXSERVE_BASE_URL"
RETRY_STATUSES = (429, 503)
IDEMPOTENCY_HEADER = "Idempotency-Key"


class JobFailed(PrefixServeError):
    """`Job.wait()`: the job ended `failed` (its error is the message) or `cancelled`."""


# ---- shared, I/O-free pieces ------------------------------------------------------------------
def _settings(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    url = (base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get(ENV_API_KEY)
    headers = {"User-Agent": "prefixserve-client/0.1"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return url, headers


def _retry_delay(attempt: int, retry_after: str | None, base: float = 0.5, cap: float = 30.0) -> float:
    """Honour Retry-After when given, else exponential backoff; both with jitter."""
    if retry_after is not None:
        try:
            return float(retry_after) + random.uniform(0, 0.25)
        except ValueError:
            pass
    return min(cap, base * 2**attempt) * random.uniform(0.5, 1.5)


def _creation(idempotency_key: str | None) -> dict[str, dict[str, str]]:
    """httpx keyword arguments of a POST /prefixes: one Idempotency-Key per logical call (a new UUID
    unless given), sent unchanged on every retry, so a retry can never create a second prefix or job."""
    return {"headers": {IDEMPOTENCY_HEADER: idempotency_key or str(uuid.uuid4())}}


def _retries_transport_errors(kwargs: dict[str, Any]) -> bool:
    """A request with an Idempotency-Key is safe to resend after a dropped connection (the server
    may have acted before the reply was lost: the key makes it answer the first result again)."""
    return IDEMPOTENCY_HEADER in kwargs.get("headers", {})


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    retry_after = response.headers.get("retry-after")
    raise error_for(response.status_code, body, float(retry_after) if retry_after else None)


def _generate_body(prefix_id: str | None, input: str, params: dict[str, Any], stream: bool) -> dict[str, Any]:
    return {"prefix_id": prefix_id, "input": input, **params, "stream": stream}


def _score_body(prefix_id: str | None, input: str, continuation: str, top_logprobs: int) -> dict[str, Any]:
    return {
        "prefix_id": prefix_id,
        "input": input,
        "continuation": continuation,
        "top_logprobs": top_logprobs,
    }


def _given(**fields: Any) -> dict[str, Any]:
    """The fields that are not None: an admin request body (only what is given is sent) or query. A
    `limits` mapping is sent whole, its None values as null: those limits go back to the server's default."""
    body = {k: v for k, v in fields.items() if v is not None}
    if "limits" in body:
        body["limits"] = dict(body["limits"])
    return body


def _key_list(response: httpx.Response) -> list[ApiKey]:
    return [ApiKey.model_validate(k) for k in response.json()["keys"]]


def _usage_days(response: httpx.Response) -> list[UsageDay]:
    return [UsageDay.model_validate(d) for d in response.json()["days"]]


def _tenant_list(response: httpx.Response) -> list[Tenant]:
    return [Tenant.model_validate(t) for t in response.json()["tenants"]]


class _SSE:
    """Server-Sent Events, one line at a time: `feed` returns (event, data) when a data line completes one."""

    def __init__(self) -> None:
        self.event = "message"

    def feed(self, line: str) -> tuple[str, dict] | None:
        if line.startswith("event: "):
            self.event = line[7:].strip()
        elif line.startswith("data: "):
            event, self.event = self.event, "message"
            return event, json.loads(line[6:])
        return None


def _stream_item(event: str, data: dict) -> str | None:
    """The text of a token event; raises on an error event; None on `done`."""
    if event == "error":
        err = data.get("error", {})
        raise error_for(SSE_ERROR_STATUS.get(err.get("type"), 500), data, None)
    return data.get("text", "") if event == "token" else None


def _upload_files(path: str | Path) -> dict[str, tuple[str, bytes]]:
    """A native prefix file, or a PEFT adapter directory."""
    p = Path(path)
    if p.is_dir():
        cfg, weights = p / "adapter_config.json", p / "adapter_model.safetensors"
        if not (cfg.exists() and weights.exists()):
            raise FileNotFoundError(
                f"{p} is a directory without adapter_config.json + adapter_model.safetensors"
            )
        return {
            "adapter_config": (cfg.name, cfg.read_bytes()),
            "adapter_model": (weights.name, weights.read_bytes()),
        }
    return {"file": (p.name, p.read_bytes())}


def _train_request(
    examples: Iterable[dict] | str | Path, name: str, visibility: str, hyperparameters: dict[str, Any]
) -> dict[str, Any]:
    """httpx keyword arguments: JSON for in-memory examples, a multipart JSONL upload for a file."""
    if isinstance(examples, str | Path):
        data = Path(examples).read_bytes()
        form = {"name": name, "visibility": visibility, "hyperparameters": json.dumps(hyperparameters)}
        return {"files": {"train": (Path(examples).name, data)}, "data": form}
    body = {"examples": [dict(e) for e in examples], **hyperparameters}
    return {"json": {"train": body, "name": name, "visibility": visibility}}


def _evaluation_request(
    examples: Iterable[dict] | str | Path, metrics: list[str] | None, max_new_tokens: int | None
) -> dict[str, Any]:
    """httpx keyword arguments: JSON for in-memory examples, a multipart JSONL upload for a file."""
    config = {
        k: v for k, v in {"metrics": metrics, "max_new_tokens": max_new_tokens}.items() if v is not None
    }
    if isinstance(examples, str | Path):
        data = Path(examples).read_bytes()
        return {"files": {"examples": (Path(examples).name, data)}, "data": {"config": json.dumps(config)}}
    return {"json": {"examples": list(examples), **config}}


def _progress_line(state: JobState) -> str:
    width = 24
    done = int(width * state.step / state.total_steps) if state.total_steps else 0
    loss = f"{state.loss:.4f}" if state.loss is not None else "-"
    eta = f"{state.eta_s:.0f}s" if state.eta_s is not None else "-"
    epochs = state.config.get("epochs", "?")
    return (
        f"\r[{'#' * done}{'.' * (width - done)}] {state.status} epoch {state.epoch}/{epochs} "
        f"step {state.step}/{state.total_steps} loss {loss} {sparkline(state.losses, 20)} eta {eta}   "
    )


# ---- sync ------------------------------------------------------------------------------------------
class Client:
    """A synchronous client.

    >>> from prefixserve_client import Client
    >>> client = Client("http://localhost:8000", api_key="sk-...")   # or PREFIXSERVE_BASE_URL / _API_KEY
    >>> p = client.prefixes.from_text("Answer in one short sentence.\\n")
    >>> client.generate(p.id, "What is prefix tuning?", max_new_tokens=32).text
    >>> for piece in client.stream(p.id, "Tell me more", max_new_tokens=64):
    ...     print(piece, end="", flush=True)

    Requests answered 429 or 503 are retried with backoff and jitter (honouring Retry-After) up to
    `max_retries` times; creations (`prefixes.upload`, `.from_text`, `.train`) carry an
    Idempotency-Key, so they are also retried after a dropped connection and never create twice.
    Other errors raise a typed exception (`PrefixNotFound`, `ValidationError`,
    `AuthenticationError`, `Overloaded`, `QuotaExceeded`, `ServerError`, ...).

    `client.usage()` is the calling tenant's own usage. `client.admin` (tenants, their keys, everyone's
    usage) needs the server's admin key as this client's key: `Client(url, api_key=ADMIN_KEY)`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
    ) -> None:
        self.base_url, headers = _settings(base_url, api_key)
        self.max_retries = max_retries
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.prefixes = Prefixes(self)
        self.jobs = Jobs(self)
        self.admin = Admin(self)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TimeoutException as exc:
                raise Timeout(f"{method} {path} timed out: {exc}") from exc
            except httpx.TransportError as exc:
                if not _retries_transport_errors(kwargs) or attempt == self.max_retries:
                    raise ServerError(f"{method} {path} failed: {exc}") from exc
                time.sleep(_retry_delay(attempt, None))
                continue
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                return _check(response)
            time.sleep(_retry_delay(attempt, response.headers.get("retry-after")))
        raise AssertionError("unreachable")

    def generate(self, prefix_id: str | None, input: str, **params: Any) -> GenerateResult:
        """Generate text; params: max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos,
        logprobs (k: each token's log-probability and k alternatives in `result.logprobs`)."""
        body = _generate_body(prefix_id, input, params, stream=False)
        return GenerateResult.model_validate(self._request("POST", "/generate", json=body).json())

    def score(
        self, prefix_id: str | None, input: str, continuation: str, top_logprobs: int = 0
    ) -> ScoreResult:
        """The log-probability of `continuation` after `input` under the prefix (nothing generated)."""
        body = _score_body(prefix_id, input, continuation, top_logprobs)
        return ScoreResult.model_validate(self._request("POST", "/score", json=body).json())

    def stream(self, prefix_id: str | None, input: str, **params: Any) -> Iterator[str]:
        """Generate and yield text pieces as they are produced (one per token)."""
        body = _generate_body(prefix_id, input, params, stream=True)
        for attempt in range(self.max_retries + 1):
            with self._http.stream("POST", "/generate", json=body) as response:
                if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                    response.read()
                    time.sleep(_retry_delay(attempt, response.headers.get("retry-after")))
                    continue
                if not response.is_success:
                    response.read()
                    _check(response)
                sse = _SSE()
                for line in response.iter_lines():
                    if (item := sse.feed(line)) is not None:
                        if (text := _stream_item(*item)) is None:
                            return
                        yield text
                return

    def usage(self, days: int = 7) -> UsageReport:
        """Your usage per UTC day over the last `days` days (today included), its totals, what you store
        now and the limits that apply to you."""
        return UsageReport.model_validate(self._request("GET", "/usage", params={"days": days}).json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Prefixes:
    """`client.prefixes`: upload, compile, train, list, get, delete."""

    def __init__(self, client: Client) -> None:
        self._c = client

    # Each creation sends an Idempotency-Key (a new UUID per call unless `idempotency_key` is given:
    # pass your own to retry a call across processes); its retries resend it, so they never duplicate.
    def upload(
        self,
        path: str | Path,
        name: str = "",
        visibility: str = "private",
        idempotency_key: str | None = None,
    ) -> Prefix:
        """Upload a native `.safetensors` prefix file or a PEFT adapter directory."""
        data = {"name": name, "visibility": visibility}
        kwargs = {"files": _upload_files(path), "data": data, **_creation(idempotency_key)}
        return Prefix.model_validate(self._c._request("POST", "/prefixes", **kwargs).json())

    def from_text(
        self, text: str, name: str = "", visibility: str = "private", idempotency_key: str | None = None
    ) -> Prefix:
        """Compile a text prompt (instruction or few-shot block) into a prefix."""
        body = {"text": text, "name": name, "visibility": visibility}
        kwargs = {"json": body, **_creation(idempotency_key)}
        return Prefix.model_validate(self._c._request("POST", "/prefixes", **kwargs).json())

    def train(
        self,
        examples: Iterable[dict] | str | Path,
        name: str = "",
        visibility: str = "private",
        idempotency_key: str | None = None,
        **hyperparameters: Any,
    ) -> Job:
        """Train a prefix from `[{"input", "output"}, ...]` or a JSONL file; returns the queued `Job`."""
        kwargs = {**_train_request(examples, name, visibility, hyperparameters), **_creation(idempotency_key)}
        return Job(self._c, JobState.model_validate(self._c._request("POST", "/prefixes", **kwargs).json()))

    def evaluate(
        self,
        prefix_id: str,
        examples: Iterable[dict] | str | Path,
        metrics: list[str] | None = None,
        max_new_tokens: int | None = None,
    ) -> Job:
        """Evaluate a prefix on `[{"input", "output"}, ...]` or a JSONL file (BLEU, ROUGE-L, exact match,
        loss by default); returns the queued `Job`. After `job.wait()`, `job.state.evaluation` is its
        result (and `prefixes.get(prefix_id).evaluations` lists all of yours, oldest first)."""
        kwargs = _evaluation_request(examples, metrics, max_new_tokens)
        reply = self._c._request("POST", f"/prefixes/{prefix_id}/evaluations", **kwargs)
        return Job(self._c, JobState.model_validate(reply.json()))

    def list(self) -> list[Prefix]:
        """Your prefixes and every public one."""
        return [Prefix.model_validate(p) for p in self._c._request("GET", "/prefixes").json()["prefixes"]]

    def get(self, prefix_id: str) -> Prefix:
        return Prefix.model_validate(self._c._request("GET", f"/prefixes/{prefix_id}").json())

    def delete(self, prefix_id: str) -> None:
        self._c._request("DELETE", f"/prefixes/{prefix_id}")


class Jobs:
    def __init__(self, client: Client) -> None:
        self._c = client

    def get(self, job_id: str) -> Job:
        return Job(self._c, JobState.model_validate(self._c._request("GET", f"/jobs/{job_id}").json()))

    def list(self, limit: int = 50) -> list[JobState]:
        """Your jobs, newest first."""
        response = self._c._request("GET", "/jobs", params={"limit": limit})
        return [JobState.model_validate(j) for j in response.json()["jobs"]]


class Job:
    """A training job. `wait()` polls until it ends and returns the trained `Prefix`."""

    def __init__(self, client: Client, state: JobState) -> None:
        self._c, self.state = client, state

    @property
    def id(self) -> str:
        return self.state.id

    def refresh(self) -> JobState:
        self.state = JobState.model_validate(self._c._request("GET", f"/jobs/{self.id}").json())
        return self.state

    def cancel(self, wait: bool = False, poll_s: float = 0.2, timeout: float = 60.0) -> JobState:
        """Ask the server to cancel; a running job stops at its worker's next progress save (about a
        second), so the answer may still say `running`. With `wait`, return once the job has ended."""
        self.state = JobState.model_validate(self._c._request("DELETE", f"/jobs/{self.id}").json())
        deadline = time.monotonic() + timeout
        while wait and not self.state.done:
            if time.monotonic() > deadline:
                raise Timeout(f"job {self.id} still {self.state.status} {timeout}s after it was cancelled")
            time.sleep(poll_s)
            self.refresh()
        return self.state

    def wait(self, progress: bool = False, poll_s: float = 1.0, timeout: float | None = None) -> Prefix:
        """Block until the job ends; with `progress`, draw a bar (epoch, step, loss) on stderr."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.refresh().done:
            if progress:
                sys.stderr.write(_progress_line(self.state))
                sys.stderr.flush()
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"job {self.id} still {self.state.status} after {timeout}s")
            time.sleep(poll_s)
        if progress:
            sys.stderr.write(_progress_line(self.state) + "\n")
        return self._c.prefixes.get(_trained_prefix_id(self.state))


def _trained_prefix_id(state: JobState) -> str:
    """The prefix a finished job published; JobFailed if it failed or was cancelled."""
    if state.status != "succeeded" or state.prefix_id is None:
        raise JobFailed(f"job {state.id} {state.status}: {state.error or ''}".strip(), 0, state.status)
    return state.prefix_id


class Admin:
    """`client.admin`: tenants, their API keys and every tenant's usage (the server's /admin API).

    Every call sends the client's own key, which must be the server's admin key (PREFIXSERVE_ADMIN_KEY):

    >>> admin = Client("http://localhost:8000", api_key=ADMIN_KEY)
    >>> admin.admin.tenants.create("acme", weight=2.0, limits={"requests_per_minute": 600})
    >>> key = admin.admin.keys.issue("acme", name="ci").key     # shown only this once
    >>> admin.admin.usage(days=7, tenant="acme")

    A tenant's key is refused with `PermissionDenied`, no key with `AuthenticationError`.
    """

    def __init__(self, client: Client) -> None:
        self._c = client
        self.tenants = AdminTenants(client)
        self.keys = AdminKeys(client)

    def usage(self, days: int = 7, tenant: str | None = None) -> list[UsageDay]:
        """One row per tenant and UTC day with any usage over the last `days` days, newest day first."""
        return _usage_days(self._c._request("GET", "/admin/usage", params=_given(days=days, tenant=tenant)))


class AdminTenants:
    """`client.admin.tenants`: create, list, get, update. Limits (names as in `Tenant.effective_limits`:
    requests_per_minute, tokens_per_minute, max_concurrent, max_stored_prefixes, max_stored_bytes,
    max_active_jobs; 0 is unlimited) not set for a tenant are the server's defaults."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(
        self,
        name: str,
        weight: float = 1.0,
        status: str = "active",
        limits: Mapping[str, int | None] | None = None,
    ) -> Tenant:
        """A new tenant (`ValidationError`, status 409, if it exists); then issue it a key."""
        body = _given(name=name, status=status, weight=weight, limits=limits)
        return Tenant.model_validate(self._c._request("POST", "/admin/tenants", json=body).json())

    def list(self) -> list[Tenant]:
        """Every tenant: those created here and those known only from keys configured on the server."""
        return _tenant_list(self._c._request("GET", "/admin/tenants"))

    def get(self, name: str) -> Tenant:
        return Tenant.model_validate(self._c._request("GET", f"/admin/tenants/{name}").json())

    def update(
        self,
        name: str,
        status: str | None = None,
        weight: float | None = None,
        limits: Mapping[str, int | None] | None = None,
    ) -> Tenant:
        """Change what is given: `status` ("disabled": its keys are refused within seconds), `weight`, or
        the limits named in `limits` (the others stay; a limit given as None goes back to the default)."""
        body = _given(status=status, weight=weight, limits=limits)
        return Tenant.model_validate(self._c._request("PATCH", f"/admin/tenants/{name}", json=body).json())


class AdminKeys:
    """`client.admin.keys`: issue, list, revoke a tenant's API keys."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def issue(self, tenant: str, name: str = "") -> IssuedKey:
        """A new key for `tenant`, labelled `name`: `.key` is the key, returned only this once."""
        response = self._c._request("POST", f"/admin/tenants/{tenant}/keys", json={"name": name})
        return IssuedKey.model_validate(response.json())

    def list(self, tenant: str) -> list[ApiKey]:
        """The tenant's issued keys (ids and labels, never the keys; configured keys are only counted, in
        `Tenant.config_keys`)."""
        return _key_list(self._c._request("GET", f"/admin/tenants/{tenant}/keys"))

    def revoke(self, tenant: str, key_id: str) -> None:
        """Refused by every replica within seconds."""
        self._c._request("DELETE", f"/admin/tenants/{tenant}/keys/{key_id}")


# ---- async -----------------------------------------------------------------------------------------
class AsyncClient:
    """The asyncio twin of `Client`.

    >>> async with AsyncClient("http://localhost:8000", api_key="sk-...") as client:
    ...     result = await client.generate(prefix_id, "Hello", max_new_tokens=16)
    ...     async for piece in client.stream(prefix_id, "Hello"):
    ...         print(piece, end="")

    `await client.usage()` is the calling tenant's own usage; `client.admin` (the same methods as
    `Client.admin`, awaited) needs the server's admin key as this client's key.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
    ) -> None:
        self.base_url, headers = _settings(base_url, api_key)
        self.max_retries = max_retries
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)
        self.prefixes = AsyncPrefixes(self)
        self.jobs = AsyncJobs(self)
        self.admin = AsyncAdmin(self)

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TimeoutException as exc:
                raise Timeout(f"{method} {path} timed out: {exc}") from exc
            except httpx.TransportError as exc:
                if not _retries_transport_errors(kwargs) or attempt == self.max_retries:
                    raise ServerError(f"{method} {path} failed: {exc}") from exc
                await asyncio.sleep(_retry_delay(attempt, None))
                continue
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                return _check(response)
            await asyncio.sleep(_retry_delay(attempt, response.headers.get("retry-after")))
        raise AssertionError("unreachable")

    async def generate(self, prefix_id: str | None, input: str, **params: Any) -> GenerateResult:
        body = _generate_body(prefix_id, input, params, stream=False)
        return GenerateResult.model_validate((await self._request("POST", "/generate", json=body)).json())

    async def score(
        self, prefix_id: str | None, input: str, continuation: str, top_logprobs: int = 0
    ) -> ScoreResult:
        body = _score_body(prefix_id, input, continuation, top_logprobs)
        return ScoreResult.model_validate((await self._request("POST", "/score", json=body)).json())

    async def stream(self, prefix_id: str | None, input: str, **params: Any) -> AsyncIterator[str]:
        body = _generate_body(prefix_id, input, params, stream=True)
        for attempt in range(self.max_retries + 1):
            async with self._http.stream("POST", "/generate", json=body) as response:
                if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                    await response.aread()
                    await asyncio.sleep(_retry_delay(attempt, response.headers.get("retry-after")))
                    continue
                if not response.is_success:
                    await response.aread()
                    _check(response)
                sse = _SSE()
                async for line in response.aiter_lines():
                    if (item := sse.feed(line)) is not None:
                        if (text := _stream_item(*item)) is None:
                            return
                        yield text
                return

    async def usage(self, days: int = 7) -> UsageReport:
        response = await self._request("GET", "/usage", params={"days": days})
        return UsageReport.model_validate(response.json())

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncPrefixes:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def upload(
        self,
        path: str | Path,
        name: str = "",
        visibility: str = "private",
        idempotency_key: str | None = None,
    ) -> Prefix:
        data = {"name": name, "visibility": visibility}
        kwargs = {"files": _upload_files(path), "data": data, **_creation(idempotency_key)}
        response = await self._c._request("POST", "/prefixes", **kwargs)
        return Prefix.model_validate(response.json())

    async def from_text(
        self, text: str, name: str = "", visibility: str = "private", idempotency_key: str | None = None
    ) -> Prefix:
        body = {"text": text, "name": name, "visibility": visibility}
        kwargs = {"json": body, **_creation(idempotency_key)}
        return Prefix.model_validate((await self._c._request("POST", "/prefixes", **kwargs)).json())

    async def train(
        self,
        examples: Iterable[dict] | str | Path,
        name: str = "",
        visibility: str = "private",
        idempotency_key: str | None = None,
        **hyperparameters: Any,
    ) -> AsyncJob:
        kwargs = {**_train_request(examples, name, visibility, hyperparameters), **_creation(idempotency_key)}
        response = await self._c._request("POST", "/prefixes", **kwargs)
        return AsyncJob(self._c, JobState.model_validate(response.json()))

    async def evaluate(
        self,
        prefix_id: str,
        examples: Iterable[dict] | str | Path,
        metrics: list[str] | None = None,
        max_new_tokens: int | None = None,
    ) -> AsyncJob:
        kwargs = _evaluation_request(examples, metrics, max_new_tokens)
        reply = await self._c._request("POST", f"/prefixes/{prefix_id}/evaluations", **kwargs)
        return AsyncJob(self._c, JobState.model_validate(reply.json()))

    async def list(self) -> list[Prefix]:
        response = await self._c._request("GET", "/prefixes")
        return [Prefix.model_validate(p) for p in response.json()["prefixes"]]

    async def get(self, prefix_id: str) -> Prefix:
        return Prefix.model_validate((await self._c._request("GET", f"/prefixes/{prefix_id}")).json())

    async def delete(self, prefix_id: str) -> None:
        await self._c._request("DELETE", f"/prefixes/{prefix_id}")


class AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def get(self, job_id: str) -> AsyncJob:
        response = await self._c._request("GET", f"/jobs/{job_id}")
        return AsyncJob(self._c, JobState.model_validate(response.json()))

    async def list(self, limit: int = 50) -> list[JobState]:
        """Your jobs, newest first."""
        response = await self._c._request("GET", "/jobs", params={"limit": limit})
        return [JobState.model_validate(j) for j in response.json()["jobs"]]


class AsyncJob:
    def __init__(self, client: AsyncClient, state: JobState) -> None:
        self._c, self.state = client, state

    @property
    def id(self) -> str:
        return self.state.id

    async def refresh(self) -> JobState:
        self.state = JobState.model_validate((await self._c._request("GET", f"/jobs/{self.id}")).json())
        return self.state

    async def cancel(self, wait: bool = False, poll_s: float = 0.2, timeout: float = 60.0) -> JobState:
        """As `Job.cancel`."""
        self.state = JobState.model_validate((await self._c._request("DELETE", f"/jobs/{self.id}")).json())
        deadline = time.monotonic() + timeout
        while wait and not self.state.done:
            if time.monotonic() > deadline:
                raise Timeout(f"job {self.id} still {self.state.status} {timeout}s after it was cancelled")
            await asyncio.sleep(poll_s)
            await self.refresh()
        return self.state

    async def wait(self, progress: bool = False, poll_s: float = 1.0, timeout: float | None = None) -> Prefix:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (await self.refresh()).done:
            if progress:
                sys.stderr.write(_progress_line(self.state))
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"job {self.id} still {self.state.status} after {timeout}s")
            await asyncio.sleep(poll_s)
        return await self._c.prefixes.get(_trained_prefix_id(self.state))


class AsyncAdmin:
    """`AsyncClient.admin`: the async twin of `Client.admin`, with the same methods. Needs the server's
    admin key as the client's key: `AsyncClient(url, api_key=ADMIN_KEY)`."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client
        self.tenants = AsyncAdminTenants(client)
        self.keys = AsyncAdminKeys(client)

    async def usage(self, days: int = 7, tenant: str | None = None) -> list[UsageDay]:
        params = _given(days=days, tenant=tenant)
        return _usage_days(await self._c._request("GET", "/admin/usage", params=params))


class AsyncAdminTenants:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(
        self,
        name: str,
        weight: float = 1.0,
        status: str = "active",
        limits: Mapping[str, int | None] | None = None,
    ) -> Tenant:
        body = _given(name=name, status=status, weight=weight, limits=limits)
        return Tenant.model_validate((await self._c._request("POST", "/admin/tenants", json=body)).json())

    async def list(self) -> list[Tenant]:
        return _tenant_list(await self._c._request("GET", "/admin/tenants"))

    async def get(self, name: str) -> Tenant:
        return Tenant.model_validate((await self._c._request("GET", f"/admin/tenants/{name}")).json())

    async def update(
        self,
        name: str,
        status: str | None = None,
        weight: float | None = None,
        limits: Mapping[str, int | None] | None = None,
    ) -> Tenant:
        body = _given(status=status, weight=weight, limits=limits)
        response = await self._c._request("PATCH", f"/admin/tenants/{name}", json=body)
        return Tenant.model_validate(response.json())


class AsyncAdminKeys:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def issue(self, tenant: str, name: str = "") -> IssuedKey:
        response = await self._c._request("POST", f"/admin/tenants/{tenant}/keys", json={"name": name})
        return IssuedKey.model_validate(response.json())

    async def list(self, tenant: str) -> list[ApiKey]:
        return _key_list(await self._c._request("GET", f"/admin/tenants/{tenant}/keys"))

    async def revoke(self, tenant: str, key_id: str) -> None:
        await self._c._request("DELETE", f"/admin/tenants/{tenant}/keys/{key_id}")
