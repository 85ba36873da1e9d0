"""The fixed virtual shard space and its map onto shard actors."""

from __future__ import annotations

import functools
import hashlib

# Fixed forever: ids hash into this space, and checkpoints are kept per virtual
# shard, so the number of shard actors can change without moving any data.
# ~10x the largest actor count we plan for (Orleans/Akka practice).
VSHARDS = 256


@functools.lru_cache(maxsize=1 << 20)  # beneficiaries repeat: the top of a tree is in every chain
def vshard_of(user_id: str) -> int:
    """Stable across processes and Python versions, unlike hash()."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % VSHARDS


def actor_of_vshard(vshard: int, actor_count: int) -> int:
    return vshard % actor_count


def vshards_of_actor(actor_index: int, actor_count: int) -> list[int]:
    return [v for v in range(VSHARDS) if v % actor_count == actor_index]


def shard_actor_name(index: int) -> str:
    return f"user-shard-{index}"


def chain_actor_name(index: int) -> str:
    return f"commission-chain-{index}"


def chain_of_transaction(transaction_id: str, chain_count: int) -> int:
    """Every delivery of one transaction id meets the same chain actor."""
    digest = hashlib.blake2b(transaction_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % chain_count
