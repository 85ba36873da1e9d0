"""The engine's error vocabulary, shared by every boundary.

`EngineError` subclasses are operating errors: raised where the fact is known,
translated to RFC 9457 problem+json (HTTP) once, at the edge.
"""

from __future__ import annotations

from .messages import PATTERN_MEANINGS, Problem, ProblemField

PROBLEM_TYPE_BASE = "https://problems.dailydoco.dev/"
# Every error the engine answers has this type (RFC 9457), the ingress's
# own included: a client tells the engine's answers from a proxy's by it.
PROBLEM_MEDIA_TYPE = "application/problem+json"


class EngineError(Exception):
    """Base of every error a client can cause; carries its HTTP status."""

    status = 400
    slug = "bad-request"
    title = "Bad request"

    def __init__(
        self, detail: str, *, errors: list[ProblemField] | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.retry_after_s = retry_after_s

    def problem(self, instance: str | None = None, transaction_id: str | None = None) -> Problem:
        return Problem(
            type=PROBLEM_TYPE_BASE + self.slug,
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            errors=self.errors,
            transaction_id=transaction_id,
        )

    def __reduce__(self):  # survives pickling across Ray actor boundaries
        return (_rebuild_error, (type(self), self.detail, self.errors, self.retry_after_s))


def _rebuild_error(cls, detail, errors, retry_after_s):
    return cls(detail, errors=errors, retry_after_s=retry_after_s)


class MalformedBody(EngineError):
    """The body is not parseable JSON."""

    status, slug, title = 400, "malformed-body", "Malformed request body"


class InvalidRequest(EngineError):
    """The body parsed but a field breaks its constraints."""

    status, slug, title = 422, "validation", "Request failed validation"


def validation_message(error: Exception) -> str:
    """msgspec's message for a value that broke its constraints, each of our
    patterns named by what it asks for (msgspec quotes the regex, as repr)."""
    message = str(error)
    for pattern, meaning in PATTERN_MEANINGS.items():
        message = message.replace(f"`str` matching regex {pattern!r}", meaning)
    return message


class Unauthorized(EngineError):
    """No credentials, or credentials that do not verify."""

    status, slug, title = 401, "unauthorized", "Unauthorized"


class Forbidden(EngineError):
    """Valid credentials that do not cover this resource."""

    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(EngineError):
    """The named resource does not exist."""

    status, slug, title = 404, "not-found", "Not found"


class UnknownUser(EngineError):
    """A request names a user that is not registered."""

    status, slug, title = 422, "unknown-user", "Unknown user"


class UnknownReferralCode(EngineError):
    """A registration names a referral code that no user holds."""

    status, slug, title = 422, "unknown-referral-code", "Unknown referral code"


class SelfReferral(EngineError):
    """A registration tries to use the registering user's own code."""

    status, slug, title = 422, "self-referral", "Self-referral is not allowed"


class IdempotencyConflict(EngineError):
    """An id was reused with a different body."""

    status, slug, title = 409, "idempotency-conflict", "Id reused with a different body"


class RefundExceedsPurchase(EngineError):
    """A refund would take back more than the purchase's remaining amount."""

    status, slug, title = 422, "refund-exceeds-purchase", "Refund exceeds what remains refundable"


class UnsupportedMediaType(EngineError):
    """A body was sent with a content type other than application/json."""

    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class PayloadTooLarge(EngineError):
    """A body over the named size limit."""

    status, slug, title = 413, "payload-too-large", "Payload too large"


class ClockLocked(EngineError):
    """The engine clock can only be moved when the deployment allows it."""

    status, slug, title = 403, "clock-locked", "Clock is not adjustable"


class ServiceUnavailable(EngineError):
    """A dependency the request needs is down; retry with the same id."""

    status, slug, title = 503, "unavailable", "Service unavailable"


class CommitOutcomeUnknown(ServiceUnavailable):
    """The database connection was lost while a write committed: it may or
    may not be recorded. A retry with the same id learns which (it replays
    the write, or makes it). `backend_pid`, set by the writer for its own
    clean-up (Ledger.settle), does not travel across Ray."""

    status, slug, title = 503, "commit-outcome-unknown", "Write outcome unknown"
    backend_pid: int | None = None


class MethodNotAllowed(EngineError):
    """The path exists but not with this method."""

    status, slug, title = 405, "method-not-allowed", "Method not allowed"


class RateLimited(EngineError):
    """A principal sent more requests than its GCRA limit allows; see Retry-After."""

    status, slug, title = 429, "rate-limited", "Too many requests"


class InternalError(EngineError):
    """A server bug; the request may or may not have been applied; retry with the same id."""

    status, slug, title = 500, "internal", "Internal server error"


def error_named(name: str, detail: str, retry_after_s: float | None = None) -> EngineError:
    """Rebuild an EngineError sent by class name (see PurchaseOutcomeWire, EngineErrorWire)."""
    cls = _ERRORS_BY_NAME.get(name, InternalError)
    return cls(detail, retry_after_s=retry_after_s)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


_ERRORS_BY_NAME = {cls.__name__: cls for cls in _subclasses(EngineError)}
