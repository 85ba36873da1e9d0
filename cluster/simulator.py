"""A seeded viral referral network and its purchases.

A Galton-Watson branching process: every member invites Poisson(k) others,
where k is the viral coefficient; when a generation dies out (k < 1), organic
sign-ups start new trees. The demo, the benchmark and the tests all draw their
users and purchases from here.
"""

from __future__ import annotations

import math
import random
from typing import Iterator, NamedTuple

# Plan prices in micros, with a few odd amounts so rounding is exercised.
PLAN_PRICES_MICROS = (9_990_000, 19_990_000, 49_000_000, 99_000_000, 1_234_567, 333_333)
ORGANIC_SIGNUP_SHARE = 0.05  # of each generation, joining with no referrer


class Registration(NamedTuple):
    user_id: str
    referrer_id: str | None


class Purchase(NamedTuple):
    transaction_id: str
    user_id: str
    amount_micros: int


def _poisson(rng: random.Random, mean: float) -> int:
    # Knuth's method: exact, and fast for the small means we use.
    limit, k, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


class ViralNetwork:
    def __init__(self, seed: int, viral_coefficient: float = 1.2, id_prefix: str = "u"):
        assert viral_coefficient >= 0
        self.rng = random.Random(seed)
        self.k = viral_coefficient
        self.prefix = id_prefix
        self.members: list[str] = []
        self._frontier: list[str] = []
        self._purchases = 0

    def _new_id(self) -> str:
        return f"{self.prefix}{len(self.members):07d}"

    def registrations(self, count: int) -> Iterator[Registration]:
        """The next `count` sign-ups, each after its referrer."""
        produced = 0
        while produced < count:
            if not self._frontier:
                organic = max(1, int(len(self.members) * ORGANIC_SIGNUP_SHARE)) if self.members else 1
                for _ in range(min(organic, count - produced)):
                    user = self._new_id()
                    self.members.append(user)
                    self._frontier.append(user)
                    produced += 1
                    yield Registration(user, None)
                continue
            next_frontier = []
            for referrer in self._frontier:
                for _ in range(_poisson(self.rng, self.k)):
                    if produced >= count:
                        break
                    user = self._new_id()
                    self.members.append(user)
                    next_frontier.append(user)
                    produced += 1
                    yield Registration(user, referrer)
            self._frontier = next_frontier

    def purchases(self, count: int, run: str = "") -> Iterator[Purchase]:
        """The next `count` purchases. `run` goes into each transaction id: a
        run of the same seed against a ledger that kept the last one's
        purchases (a demo started again) buys anew instead of replaying them."""
        assert self.members, "register users first"
        for _ in range(count):
            self._purchases += 1
            yield Purchase(
                transaction_id=f"{self.prefix}tx{run}{self._purchases:09d}-{self.rng.getrandbits(32):08x}",
                user_id=self.rng.choice(self.members),
                amount_micros=self.rng.choice(PLAN_PRICES_MICROS),
            )
