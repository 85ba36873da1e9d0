import random
from fractions import Fraction

import pytest

from dailydoco.protocol import AMOUNT_MICROS_MAX, LEVEL_RATES_BP, proportional_reversal, split_commission


def test_rates_are_the_published_ones():
    assert LEVEL_RATES_BP == (2000, 1000, 500, 300, 200, 100, 50)


@pytest.mark.parametrize("seed", range(5))
def test_split_is_floor_per_level_and_house_keeps_the_remainder(seed):
    rng = random.Random(seed)
    for _ in range(2_000):
        amount = rng.choice([1, 2, 3, 7, 99, rng.randint(1, AMOUNT_MICROS_MAX)])
        depth = rng.randint(0, 7)
        paid, house = split_commission(amount, depth)
        exact = [Fraction(amount * bp, 10_000) for bp in LEVEL_RATES_BP[:depth]]
        assert paid == [int(x) for x in exact]
        assert house == int(sum(exact, Fraction(0))) - sum(paid)
        assert 0 <= house <= depth


def test_known_values():
    assert split_commission(1_000_000, 7) == ([200_000, 100_000, 50_000, 30_000, 20_000, 10_000, 5_000], 0)
    assert split_commission(1, 7) == ([0] * 7, 0)
    assert split_commission(19, 7) == ([3, 1, 0, 0, 0, 0, 0], 3)  # 7.885 exact: 4 paid, 3 to the house
    assert split_commission(5, 0) == ([], 0)


@pytest.mark.parametrize("seed", range(5))
def test_partial_refunds_add_up_to_exactly_the_original(seed):
    rng = random.Random(seed)
    for _ in range(500):
        purchase = rng.randint(1, 10**9)
        original = purchase * rng.choice(LEVEL_RATES_BP) // 10_000
        refunded, total = 0, 0
        while refunded < purchase:
            step = rng.randint(1, purchase - refunded)
            part = proportional_reversal(original, purchase, refunded, refunded + step)
            refunded += step
            total += part
            assert total <= original
        assert total == original


def test_out_of_range_amounts_are_programmer_errors():
    with pytest.raises(AssertionError):
        split_commission(0, 3)
    with pytest.raises(AssertionError):
        split_commission(AMOUNT_MICROS_MAX + 1, 3)
