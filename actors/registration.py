"""Registering a user under a referral code."""

from __future__ import annotations

import msgspec

from dailydoco.protocol import (
    LEVELS_MAX,
    IdempotencyConflict,
    InvalidRequest,
    RegisterUserRequest,
    RegistrationResult,
    SelfReferral,
    UnknownReferralCode,
    new_referral_code,
    normalize_referral_code,
)
from dailydoco.storage.deltas import UserRecord
from dailydoco.storage.ledger import Ledger, body_hash

from .routing import ShardRouter, deliver, ledger_write
from .shard_core import user_view

CODE_ATTEMPTS_MAX = 8  # each collides with probability < 1e-5 at a million users


async def register_user(ledger: Ledger, router: ShardRouter, request: RegisterUserRequest) -> RegistrationResult:
    """Create the user, fix its upline, tell its ancestors' shards; idempotent by user id."""
    code = None
    if request.referral_code is not None:
        code = normalize_referral_code(request.referral_code)
        if code is None:
            raise InvalidRequest(f"referral code {request.referral_code!r} is not a well-formed code")
    hash_ = body_hash(request.user_id, code)
    existing = await ledger.get_user(request.user_id)
    if existing is not None:
        if code is not None and code == existing.referral_code:
            raise SelfReferral(f"user {request.user_id!r} cannot register with their own referral code")
        return _replay(existing, hash_)

    referrer_id, upline = None, ()
    if code is not None:
        found = await ledger.find_referrer(code)
        if found is None:
            raise UnknownReferralCode(f"no user holds referral code {code!r}")
        referrer_id, referrer_upline = found
        if referrer_id == request.user_id:
            raise SelfReferral(f"user {request.user_id!r} cannot refer themselves")
        # The referrer existed before this user, so no cycle can form.
        upline = (referrer_id, *referrer_upline)[:LEVELS_MAX]

    for _ in range(CODE_ATTEMPTS_MAX):
        xid, record, deltas = await ledger_write(
            router, ledger, ledger.insert_user, request.user_id, new_referral_code(), referrer_id, upline, hash_)
        if record is not None:
            await deliver(router, xid, deltas)
            return _result(record, "created")
        # Either a concurrent delivery of this registration won (replay it),
        # or the random code collided (draw another).
        existing = await ledger.get_user(request.user_id)
        if existing is not None:
            return _replay(existing, hash_)
    raise RuntimeError("could not draw an unused referral code")


def _replay(existing: UserRecord, hash_: bytes) -> RegistrationResult:
    """A registration seen before: the original view, or a conflict if the body differs."""
    if existing.body_hash != hash_:
        raise IdempotencyConflict(f"user {existing.user_id!r} is already registered with a different body")
    return _result(existing, "replayed")


def _result(record: UserRecord, status: str) -> RegistrationResult:
    return RegistrationResult(**msgspec.structs.asdict(user_view(record)), status=status)
