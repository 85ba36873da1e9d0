"""The network graph's read against a plain breadth-first walk of the same
random referral tree, in the real Postgres: the same edges in the same
order (by level, then user id), cut at the same place."""

from __future__ import annotations

import asyncio
import random

import pytest

from dailydoco.storage.ledger import Ledger
from dailydoco.storage.pool import open_pool
from dailydoco.storage.sharding import vshard_of
from tests.conftest import migrated_database

USERS = 600
SEED = 35


@pytest.fixture(scope="module")
def graph_database_url(servers):
    return asyncio.run(migrated_database(servers[0], "dailydoco_network_graph"))


def _random_tree(rng: random.Random) -> tuple[list[str], dict[str, str]]:
    """Users in registration order, and each one's referrer. Preferential
    attachment half the time: a few users refer most, as in a viral network."""
    users, referrer_of = ["g-root"], {}
    for i in range(1, USERS):
        user = f"g-{rng.randrange(10**6):06d}-{i}"
        pick = min(int(rng.paretovariate(1.2)) - 1, len(users) - 1) if rng.random() < 0.5 else rng.randrange(len(users))
        referrer_of[user] = users[pick]
        users.append(user)
    return users, referrer_of


def _upline(user: str, referrer_of: dict[str, str]) -> list[str]:
    upline = []
    while user in referrer_of and len(upline) < 7:
        user = referrer_of[user]
        upline.append(user)
    return upline


def _walk(referrer_of: dict[str, str], root: str, depth: int, nodes_max: int):
    """The graph as the API promises it, by brute force."""
    children: dict[str, list[str]] = {}
    for user, referrer in referrer_of.items():
        children.setdefault(referrer, []).append(user)
    edges, level_nodes = [], [root]
    for level in range(1, depth + 1):
        level_nodes = sorted(child for parent in level_nodes for child in children.get(parent, []))
        edges += [(referrer_of[child], child, level) for child in level_nodes]
    return edges[:nodes_max], len(edges) > nodes_max


async def _scenario(url: str) -> None:
    rng = random.Random(SEED)
    users, referrer_of = _random_tree(rng)
    pool = await open_pool(url, max_size=2)
    try:
        await pool.executemany(
            "INSERT INTO users (user_id, referral_code, referrer_id, upline, vshard, body_hash, created_at)"
            " VALUES ($1, $2, $3, $4, $5, '\\x00', now())",
            [(user, f"C{i}", referrer_of.get(user), _upline(user, referrer_of), vshard_of(user))
             for i, user in enumerate(users)])
        ledger = Ledger(pool, hold_period_s=3_600)
        roots = ["g-root", *rng.sample(users, 20), "g-nobody"]
        for root in roots:
            for depth in (1, 2, 3, 7):
                for nodes_max in (1, 5, 37, 2_000):
                    expected = _walk(referrer_of, root, depth, nodes_max)
                    assert await ledger.network_graph(root, depth, nodes_max) == expected, (root, depth, nodes_max)
        # Exactly as many nodes as fit is not truncated; one fewer room is.
        whole, truncated = _walk(referrer_of, "g-root", 7, USERS)
        assert not truncated and await ledger.network_graph("g-root", 7, len(whole)) == (whole, False)
        assert await ledger.network_graph("g-root", 7, len(whole) - 1) == (whole[:-1], True)
    finally:
        await pool.close()


def test_the_graph_is_the_breadth_first_walk_cut_at_its_bound(graph_database_url):
    asyncio.run(_scenario(graph_database_url))
