"""Request bodies in, JSON out: the shared edges of every HTTP handler."""

from __future__ import annotations

import re

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from dailydoco import protocol as p

BODY_BYTES_MAX = 64 * 1024  # every body but a batch: a few hundred bytes in practice
_ENCODER = msgspec.json.Encoder()
_PATH_IN_ERROR = re.compile(r" - at `(.+)`$")


# What the ids in the URL name, for the 404 of an id nothing can have.
_PATH_ID_NOUNS = {"user_id": "user", "transaction_id": "transaction", "job_id": "video job"}
_ID = re.compile(p.ID_PATTERN)


def path_id(request: Request, name: str) -> str:
    """An id from the URL. One no resource can have (ids match
    protocol.ID_PATTERN) does not exist: 404 before it reaches a query.
    Postgres refuses a NUL in text, so `/v1/users/%00/commissions` was a 500."""
    value = request.path_params[name]
    if _ID.search(value) is None:
        raise p.NotFound(f"{_PATH_ID_NOUNS[name]} {value!r} does not exist: every id is"
                         f" {p.PATTERN_MEANINGS[p.ID_PATTERN]}")
    return value


# Every number read from a URL or a header fits in 18 digits.
_DECIMAL = re.compile(r"[0-9]{1,18}")


def ascii_decimal(raw: str | None) -> int | None:
    """`raw` as an int if it is 1 to 18 ASCII digits, else None. Until
    session 35 these were read by `str.isdigit()` and `int()`: the first takes
    '²', which the second refuses, and the second refuses more than 4,300
    digits; both were 500s (`?limit=²`)."""
    return int(raw) if raw is not None and _DECIMAL.fullmatch(raw) else None


def json_response(value, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_ENCODER.encode(value), status_code=status, media_type="application/json", headers=headers)


def decode_body(body: bytes, type_):
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        message = p.validation_message(exc)
        match = _PATH_IN_ERROR.search(message)
        path = match.group(1) if match else "$"
        raise p.InvalidRequest(message, errors=[p.ProblemField(path=path, message=message)]) from exc
    except msgspec.DecodeError as exc:
        raise p.MalformedBody(f"body is not valid JSON: {exc}") from exc


async def read_body(request: Request, type_, limit_bytes: int = BODY_BYTES_MAX):
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise p.UnsupportedMediaType(f"send Content-Type: application/json (got {media or 'none'!r})")
    declared = ascii_decimal(request.headers.get("content-length"))
    if declared is not None and declared > limit_bytes:
        raise p.PayloadTooLarge(f"body of {declared} bytes exceeds the {limit_bytes}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit_bytes:
            raise p.PayloadTooLarge(f"body exceeds the {limit_bytes}-byte limit")
    return decode_body(bytes(body), type_)
