"""API keys for backends, PASETO v4.public (Ed25519) tokens for users.

One algorithm per key, no header-chosen algorithms, audience and issuer always
checked (RFC 8725 / PASETO practice).
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import secrets
import struct
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dailydoco.protocol import Forbidden, Unauthorized

TOKEN_HEADER = b"v4.public."
TOKEN_ISSUER = "dailydoco"
TOKEN_AUDIENCE = "dailydoco-api"
SIGNATURE_BYTES = 64
# Tokens whose signature this process has checked. An Ed25519 check costs
# ~110 µs here, more than a balance read's Redis round trip; an app sends the
# same token with every request. Expiry and revocation are still checked each time.
VERIFIED_TOKENS_MAX = 16_384  # ~0.7 KiB each (token and claims, measured): ~11 MiB


class Secrets(msgspec.Struct, frozen=True):
    service_api_key: str
    admin_api_key: str
    token_signing_key_b64: str  # raw Ed25519 private key, base64url


def load_or_create_secrets(state_dir: str) -> Secrets:
    """Secrets live in the state directory (mode 0600), created on first start."""
    path = Path(state_dir) / "secrets.json"
    if path.exists():
        return msgspec.json.decode(path.read_bytes(), type=Secrets)
    raw_key = Ed25519PrivateKey.generate().private_bytes_raw()
    created = Secrets(
        service_api_key="dd_svc_" + secrets.token_urlsafe(24),
        admin_api_key="dd_adm_" + secrets.token_urlsafe(24),
        token_signing_key_b64=base64.urlsafe_b64encode(raw_key).decode(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(msgspec.json.encode(created))
    return created


def _pae(*pieces: bytes) -> bytes:
    """PASETO pre-authentication encoding: lengths as little-endian u64, MSB clear."""
    out = struct.pack("<Q", len(pieces))
    for piece in pieces:
        out += struct.pack("<Q", len(piece) & 0x7FFF_FFFF_FFFF_FFFF) + piece
    return out


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    """Unpadded base64url as PASETO writes it, and nothing else: each token
    has one spelling. Python's decoder skips characters outside the alphabet
    and takes padding, so until session 35 a token with '=' appended, or a
    '!' anywhere in it, still verified: endless spellings of one token, each
    a new entry in the verified tokens (below) and a new Ed25519 check."""
    decoded = base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    if _b64(decoded) != data:
        raise ValueError("not the unpadded base64url spelling of its bytes")
    return decoded


class Claims(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sub: str
    iss: str
    aud: str
    iat: dt.datetime
    exp: dt.datetime


class TokenEnded(Unauthorized):
    """The token was good but is no more: it expired or was revoked. A new one will do."""


class TokenAuthority:
    """Issues and verifies user tokens, and holds the revocations in force.

    `revoked_before` maps a user to an instant: that user's tokens issued at
    or before it are refused. The API keeps it current from Postgres and the
    revocation notices on NATS; verification itself stays pure and local."""

    def __init__(self, secrets_: Secrets):
        self._private = Ed25519PrivateKey.from_private_bytes(base64.urlsafe_b64decode(secrets_.token_signing_key_b64))
        self._public: Ed25519PublicKey = self._private.public_key()
        self._service_key = secrets_.service_api_key.encode()
        self._admin_key = secrets_.admin_api_key.encode()
        self.revoked_before: dict[str, dt.datetime] = {}
        self._verified: dict[str, Claims] = {}  # token -> its claims, oldest first

    def revoke(self, user_id: str, before: dt.datetime) -> bool:
        """Put a revocation in force; False when a later one already was."""
        current = self.revoked_before.get(user_id)
        if current is not None and current >= before:
            return False
        self.revoked_before[user_id] = before
        return True

    def is_revoked(self, claims: "Claims") -> bool:
        revoked = self.revoked_before.get(claims.sub)
        return revoked is not None and claims.iat <= revoked

    def issue(self, user_id: str, ttl_s: int, now: dt.datetime | None = None) -> tuple[str, dt.datetime]:
        # iat keeps its microseconds: a token issued right after a revocation
        # must not look as if it had been issued before it.
        now = now or dt.datetime.now(dt.timezone.utc)
        exp = (now + dt.timedelta(seconds=ttl_s)).replace(microsecond=0)
        message = msgspec.json.encode(Claims(sub=user_id, iss=TOKEN_ISSUER, aud=TOKEN_AUDIENCE, iat=now, exp=exp))
        signature = self._private.sign(_pae(TOKEN_HEADER, message, b"", b""))
        return (TOKEN_HEADER + _b64(message + signature)).decode(), exp

    def verify(self, token: str, now: dt.datetime | None = None) -> Claims:
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify_signed(token)
            if len(self._verified) >= VERIFIED_TOKENS_MAX:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = claims
        if claims.exp <= (now or dt.datetime.now(dt.timezone.utc)):
            raise TokenEnded("token has expired")
        if self.is_revoked(claims):
            raise TokenEnded("token has been revoked")
        return claims

    def _verify_signed(self, token: str) -> Claims:
        """The claims of a token this API signed for itself; raises Unauthorized."""
        raw = token.encode()
        if not raw.startswith(TOKEN_HEADER) or b"." in raw[len(TOKEN_HEADER):]:
            raise Unauthorized("token is not a v4.public token without footer")
        try:
            body = _unb64(raw[len(TOKEN_HEADER):])
        except ValueError as exc:
            raise Unauthorized("token is not valid base64url") from exc
        if len(body) <= SIGNATURE_BYTES:
            raise Unauthorized("token is too short")
        message, signature = body[:-SIGNATURE_BYTES], body[-SIGNATURE_BYTES:]
        try:
            self._public.verify(signature, _pae(TOKEN_HEADER, message, b"", b""))
        except InvalidSignature as exc:
            raise Unauthorized("token signature does not verify") from exc
        claims = msgspec.json.decode(message, type=Claims)
        if claims.iss != TOKEN_ISSUER or claims.aud != TOKEN_AUDIENCE:
            raise Unauthorized("token was not issued for this API")
        return claims

    def principal(self, authorization: str | None, api_key: str | None) -> str:
        """'service', 'admin', or 'user:<id>'; raises Unauthorized."""
        if api_key is not None:
            key = api_key.encode()
            if hmac.compare_digest(key, self._admin_key):
                return "admin"
            if hmac.compare_digest(key, self._service_key):
                return "service"
            raise Unauthorized("API key is not valid")
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():  # a scheme's name is case-insensitive (RFC 9110 11.1)
            raise Unauthorized("send an X-API-Key header, or Authorization: Bearer <user token>")
        return "user:" + self.verify(token.strip()).sub


def require_service(principal: str) -> None:
    if principal not in ("service", "admin"):
        raise Forbidden("this endpoint takes a service API key")


def require_admin(principal: str) -> None:
    if principal != "admin":
        raise Forbidden("this endpoint takes the admin API key")


def require_reader_of(principal: str, user_id: str) -> None:
    """Backends read anyone; a user reads only their own data."""
    if principal in ("service", "admin"):
        return
    if principal != "user:" + user_id:
        raise Forbidden("a user token reads only its own user's data")
