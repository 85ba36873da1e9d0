"""Commission rules as pure integer arithmetic on micro-units.

Every function here is deterministic and free of I/O, so the engine, the seeded
simulation and the naive benchmark peer all share one definition of the rules.
"""

from __future__ import annotations

# Basis points per level, level 1 (direct referrer) first. 41.5 % in all.
LEVEL_RATES_BP: tuple[int, ...] = (2_000, 1_000, 500, 300, 200, 100, 50)
LEVELS_MAX = len(LEVEL_RATES_BP)
BASIS_POINTS_PER_UNIT = 10_000
# Largest single amount we accept: 10^12 micros = 1,000,000 currency units. The
# product amount * rate then stays far below 2^63, so no intermediate overflows
# Postgres bigint either.
AMOUNT_MICROS_MAX = 1_000_000_000_000

assert LEVELS_MAX == 7
assert AMOUNT_MICROS_MAX * BASIS_POINTS_PER_UNIT < 2**63


def split_commission(amount_micros: int, upline_len: int) -> tuple[list[int], int]:
    """Return (commission per paid level, house remainder) for one purchase.

    Levels past the top of the upline are paid to no one (no compression); the
    floor-rounding remainder of the levels that *are* paid goes to the house
    rounding account, so that paid + house == the exact rational total.
    """
    assert 0 < amount_micros <= AMOUNT_MICROS_MAX
    assert 0 <= upline_len <= LEVELS_MAX
    paid: list[int] = []
    exact_bp_total = 0
    for rate_bp in LEVEL_RATES_BP[:upline_len]:
        paid.append(amount_micros * rate_bp // BASIS_POINTS_PER_UNIT)
        exact_bp_total += amount_micros * rate_bp
    # The house gets the floor of the exact total minus what the levels got: at
    # most one micro per paid level, never negative.
    house_micros = exact_bp_total // BASIS_POINTS_PER_UNIT - sum(paid)
    assert 0 <= house_micros <= upline_len
    return paid, house_micros


def proportional_reversal(
    original_micros: int,
    purchase_micros: int,
    refunded_before_micros: int,
    refunded_after_micros: int,
) -> int:
    """Micros to take back from one commission entry for one refund.

    Computed on cumulative totals so that any sequence of partial refunds adds
    up to exactly the original entry once the purchase is fully refunded, and
    never more than it at any point.
    """
    assert 0 <= refunded_before_micros < refunded_after_micros <= purchase_micros
    before = original_micros * refunded_before_micros // purchase_micros
    after = original_micros * refunded_after_micros // purchase_micros
    reversal = after - before
    assert 0 <= reversal <= original_micros
    return reversal
