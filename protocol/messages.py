"""Every request, response and error of the HTTP API as frozen msgspec Structs.

Constraints live in the types, so bad input fails at decode time with the exact
path of the offending field, and nothing downstream re-validates.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal, get_args

from msgspec import Meta, Struct

from .money import AMOUNT_MICROS_MAX, LEVELS_MAX

# Ids are ASCII and case-sensitive: one spelling per id, so two users can never
# alias each other through Unicode or case folding.
# msgspec matches patterns with re.search, where `$` also matches before a
# final newline: every pattern ends in PATTERN_END, so "USD\n" and "abc\n"
# are refused (the first reached Postgres, a 500 for its whole write group;
# the second was taken as an id), and the OpenAPI document's JSON Schema
# reads the same.
PATTERN_END = r"$(?!\n)"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}" + PATTERN_END
CURRENCY_PATTERN = r"^[A-Z]{3}" + PATTERN_END
NO_NUL_PATTERN = r"^[^\x00]*" + PATTERN_END
NO_CONTROL_CHARACTERS_PATTERN = r"^[^\x00-\x1f\x7f]+" + PATTERN_END
# What each pattern asks for, in words: a client told "Expected `str`
# matching regex '^[A-Z]{3}$(?!\n)'" learns what we wrote, not what to send.
PATTERN_MEANINGS = {
    ID_PATTERN: "an id of 1 to 128 ASCII letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
    CURRENCY_PATTERN: "a currency code of three capital letters (ISO 4217), such as USD",
    NO_NUL_PATTERN: "text without a NUL character",
    NO_CONTROL_CHARACTERS_PATTERN: "a path without control characters",
}
UserId = Annotated[str, Meta(pattern=ID_PATTERN, max_length=128)]
TransactionId = Annotated[str, Meta(pattern=ID_PATTERN, max_length=128)]
Currency = Annotated[str, Meta(pattern=CURRENCY_PATTERN)]
AmountMicros = Annotated[int, Meta(gt=0, le=AMOUNT_MICROS_MAX)]

BATCH_TRANSACTIONS_MAX = 5_000  # per POST /v1/transactions:batch; the issue asks ≥ 1,000
COMMISSIONS_PAGE_DEFAULT = 100
COMMISSIONS_PAGE_MAX = 500
PAYOUT_LINES_PAGE_DEFAULT = 1_000  # also the lines a payout's POST answers with
PAYOUT_LINES_PAGE_MAX = 5_000
NETWORK_GRAPH_DEPTH_DEFAULT = 3
NETWORK_GRAPH_DEPTH_MAX = LEVELS_MAX
NETWORK_GRAPH_NODES_MAX = 2_000  # keeps one visualisation response bounded
TOKEN_TTL_S_MAX = 7 * 24 * 3600

CommissionStatus = Literal["pending", "approved", "paid", "refunded", "reversed"]
COMMISSION_STATUSES: tuple[str, ...] = get_args(CommissionStatus)
EntryKind = Literal["commission", "refund", "clawback"]


class _Message(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=False):
    pass


# --- users -------------------------------------------------------------------


class RegisterUserRequest(_Message):
    user_id: UserId
    referral_code: Annotated[str, Meta(max_length=64)] | None = None


class UserView(_Message):
    user_id: str
    referral_code: str
    referrer_id: str | None
    upline: list[str]  # level 1 (direct referrer) first, at most 7
    created_at: dt.datetime


class RegistrationResult(UserView):
    """The user's record, and whether this delivery made it. A read of the
    record (`UserView`) says no status: until session 38 it said "created"."""

    status: Literal["created", "replayed"]


class TokenRequest(_Message):
    ttl_s: Annotated[int, Meta(gt=0, le=TOKEN_TTL_S_MAX)] = 3600


class TokenView(_Message):
    token: str
    expires_at: dt.datetime


class TokenRevocationView(_Message):
    """The user's tokens issued at or before `revoked_before` are refused
    from now on, and the live sockets opened with them are closed (4003)."""

    user_id: str
    revoked_before: dt.datetime


# --- transactions ------------------------------------------------------------


class TransactionRequest(_Message):
    transaction_id: TransactionId
    user_id: UserId
    amount_micros: AmountMicros
    currency: Currency = "USD"
    kind: Literal["purchase", "renewal"] = "purchase"


class CommissionLine(_Message):
    level: int
    beneficiary_id: str
    rate_bp: int
    amount_micros: int


class TransactionResult(_Message):
    transaction_id: str
    status: Literal["created", "replayed"]
    user_id: str
    amount_micros: int
    currency: str
    commissions: list[CommissionLine]
    house_micros: int  # floor-rounding remainder, credited to the house account


class TransactionBatchRequest(_Message):
    transactions: Annotated[list[TransactionRequest], Meta(min_length=1, max_length=BATCH_TRANSACTIONS_MAX)]


class ProblemField(_Message):
    path: str
    message: str


class Problem(Struct, frozen=True, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[ProblemField] | None = None
    transaction_id: str | None = None


class BatchItemResult(_Message):
    transaction_id: str
    result: TransactionResult | None = None
    problem: Problem | None = None


class TransactionBatchResult(_Message):
    created: int
    replayed: int
    failed: int
    results: list[BatchItemResult]


class PurchaseOutcomeWire(_Message, array_like=True):
    """One purchase's outcome between actors: msgspec bytes cost a fraction of
    pickled Structs on the hot path. `error` names an EngineError subclass."""

    result: TransactionResult | None
    error: str | None = None
    detail: str | None = None


class EngineErrorWire(_Message, array_like=True):
    """An EngineError an actor raised, sent back over a lane (actors/lane.py)
    by its subclass's name, as Ray would have pickled it."""

    error: str
    detail: str
    retry_after_s: float | None = None


# --- refunds -----------------------------------------------------------------


class RefundRequest(_Message):
    refund_id: TransactionId
    amount_micros: AmountMicros
    # Kept with the refund and returned with it; Postgres refuses a NUL in text.
    reason: Annotated[str, Meta(max_length=500, pattern=NO_NUL_PATTERN)] | None = None


class ReversalLine(_Message):
    level: int
    beneficiary_id: str
    amount_micros: int  # negative: taken back from the beneficiary
    kind: EntryKind


class RefundResult(_Message):
    refund_id: str
    transaction_id: str
    status: Literal["created", "replayed"]
    amount_micros: int
    refunded_total_micros: int
    reversals: list[ReversalLine]
    house_reversal_micros: int
    reason: str | None = None  # as recorded: a replay with another reason is a conflict (409)


# --- reads -------------------------------------------------------------------


class CommissionEntryView(_Message):
    entry_id: int
    transaction_id: str
    refund_id: str | None
    level: int
    rate_bp: int
    amount_micros: int
    currency: str
    status: CommissionStatus
    kind: EntryKind
    created_at: dt.datetime
    hold_until: dt.datetime


class CommissionPage(_Message):
    items: list[CommissionEntryView]
    next_cursor: str | None


class CurrencyBalance(_Message):
    currency: str
    pending_micros: int
    approved_micros: int  # payable at the next payout; negative while clawbacks exceed it
    paid_micros: int
    earned_micros: int  # pending + approved + paid


class StreamPosition(_Message):
    """Where a user's live stream stood when a view was read: resume from here."""

    epoch: str
    offset: int


class BalanceView(_Message):
    user_id: str
    balances: list[CurrencyBalance]
    stream: StreamPosition  # every live event up to this offset is included above


class LevelRevenue(_Message):
    currency: str
    revenue_micros_by_level: list[int]


class NetworkStats(_Message):
    user_id: str
    direct_referrals: int
    network_size: int
    size_by_level: list[int]
    revenue_by_level: list[LevelRevenue]
    depth: int
    commission_earned: list[CurrencyBalance]
    # Mean number of referrals made by the members of this user's network who
    # could have referred someone inside it (levels 1..6): the network's K.
    viral_coefficient: float


class GraphNode(_Message):
    user_id: str
    level: int  # 0 for the root


class GraphEdge(_Message):
    referrer_id: str
    user_id: str


class NetworkView(_Message):
    stats: NetworkStats
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    truncated: bool


# --- admin -------------------------------------------------------------------


class PayoutRequest(_Message):
    payout_id: TransactionId
    currency: Currency | None = None


class PayoutLine(_Message):
    beneficiary_id: str
    currency: str
    amount_micros: int


class PayoutTotal(_Message):
    currency: str
    beneficiaries: int
    amount_micros: int


class PayoutView(_Message):
    """A payout, with one page of its lines (by beneficiary, then currency)."""

    payout_id: str
    currency: str | None  # the one currency it paid; None: every currency
    created_at: dt.datetime
    # None while beneficiaries remain unpaid: the payout runs, or was cut
    # short (its POST failed), and the supervisor finishes it (so does the
    # same POST sent again).
    completed_at: dt.datetime | None
    totals: list[PayoutTotal]
    lines: list[PayoutLine]
    next_cursor: str | None  # the next page: GET /v1/payouts/{payout_id}?cursor=


class PayoutResult(PayoutView):
    """What POST /v1/payouts answers: the completed payout."""

    status: Literal["created", "replayed"]


class ClockAdvanceRequest(_Message):
    seconds: Annotated[int, Meta(gt=0, le=10 * 365 * 24 * 3600)]


class ClockView(_Message):
    now: dt.datetime
    offset_s: int


class Health(_Message):
    status: Literal["ok", "degraded"]
    checks: dict[str, str]
    region: str  # the region this replica's live gateway is in (its NATS)

