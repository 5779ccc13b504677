"""Reading request bodies that the routes parse themselves (uploads, JSON bodies of several shapes):
size-capped before anything is parsed, a client that leaves mid-body reported as such, and a malformed
body answered with a 4xx naming what was expected."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi import Request
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..errors import InvalidRequest
from ..inputs import parse_json
from .errors import ClientGone, PayloadTooLarge

MULTIPART_FRAMING_BYTES = 64 * 1024  # allowed beyond a part's limit for boundaries and headers


def json_object(raw: bytes | str, field: str = "body") -> dict:
    """`raw` as a JSON object, or InvalidRequest naming `field`."""
    try:
        data = parse_json(raw)
    except ValueError as exc:  # malformed, not UTF-8, or nested too deeply
        raise InvalidRequest(field, f"expected a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(field, f"expected a JSON object, got {type(data).__name__}")
    return data


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (PayloadTooLarge past it, before reading it all when the
    client declared its length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone(f"the client left after {size} bytes of the request body") from None
    return b"".join(chunks)


async def read_form(
    request: Request, limit: int, max_files: int, max_fields: int, malformed: Callable[[str], Exception]
) -> FormData:
    """A multipart body, size-capped before parsing (each part at most `limit` bytes); a malformed
    one raises `malformed(message)`."""
    body = await read_limited(request, limit + MULTIPART_FRAMING_BYTES)

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    try:
        return await MultiPartParser(
            request.headers, chunks(), max_files=max_files, max_fields=max_fields, max_part_size=limit
        ).parse()
    except MultiPartException as exc:
        raise malformed(f"malformed multipart upload: {exc.message}") from None
