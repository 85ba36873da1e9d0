"""Balance views in Redis (storage/balance_views.py), on the session's real Redis."""

import asyncio
import uuid

import msgspec
import redis.asyncio as redis

from dailydoco.protocol import BalanceView, CurrencyBalance, StreamPosition
from dailydoco.storage import balance_views as bv
from dailydoco.storage.balance_views import BalanceViewReader, BalanceViewWriter

from ..tcp_faults import HoldingProxy


class FakeShard:
    """The part of a shard the writer reads: its users' current views."""

    def __init__(self, users: list[str]):
        self.pending = {u: 0 for u in users}

    def view(self, user_id: str) -> BalanceView | None:
        if user_id not in self.pending:
            return None
        return BalanceView(user_id=user_id, balances=[CurrencyBalance(
            currency="USD", pending_micros=self.pending[user_id], approved_micros=0, paid_micros=0,
            earned_micros=self.pending[user_id])], stream=StreamPosition(epoch="e", offset=self.pending[user_id]))

    def writer(self, client, epoch, shard_index=0) -> BalanceViewWriter:
        return BalanceViewWriter(client, epoch, shard_index, self.view, lambda: list(self.pending))


def _run(servers, test):
    async def main():
        client = redis.from_url(servers[2])
        try:
            await test(client, uuid.uuid4().hex[:12])
        finally:
            await client.aclose()

    asyncio.run(main())


def test_views_are_the_endpoint_bodies_and_follow_changes(servers):
    async def test(client, epoch):
        shard = FakeShard(["a", "b"])
        writer = shard.writer(client, epoch)
        reader = BalanceViewReader(client, epoch)
        assert await reader.read("a", 0) is None  # nothing written yet: ask the shard
        await writer.take_over(shard.pending)
        await writer.publish(["a", "b"])
        assert await reader.read("a", 0) == msgspec.json.encode(shard.view("a"))
        shard.pending["a"] = 7
        await writer.publish(["a"])
        assert msgspec.json.decode(await reader.read("a", 0), type=BalanceView).balances[0].pending_micros == 7
        assert await reader.read("nobody", 0) is None
        writer.close()

    _run(servers, test)


def test_a_lapsed_lease_sends_reads_to_the_shard(servers):
    async def test(client, epoch):
        shard = FakeShard(["a"])
        writer = shard.writer(client, epoch)
        reader = BalanceViewReader(client, epoch)
        await writer.take_over(shard.pending)
        await writer.publish(["a"])
        assert await reader.read("a", 0) is not None
        writer.close()  # a shard that stops writing (dead, or cut off from Redis)
        await client.pexpire(bv.lease_key(epoch, 0), 1)
        await asyncio.sleep(0.01)
        assert await reader.read("a", 0) is None
        assert await reader.read("a", 1) is None  # another shard's lease says nothing of this one

    _run(servers, test)


def test_a_new_start_fences_out_the_old_writer(servers):
    async def test(client, epoch):
        shard = FakeShard(["a"])
        old = shard.writer(client, epoch)
        await old.take_over(shard.pending)
        await old.publish(["a"])
        new_shard = FakeShard(["a"])
        new_shard.pending["a"] = 5
        new = new_shard.writer(client, epoch)
        await new.take_over(new_shard.pending)
        reader = BalanceViewReader(client, epoch)
        # Taking over drops the lease: until the new start has written every
        # view, reads go to the shard, never to a view the old one left.
        assert await reader.read("a", 0) is None
        await new.publish([])
        while await reader.read("a", 0) is None:
            await asyncio.sleep(0.01)  # the renewal loop writes every view, then takes the lease
        shard.pending["a"] = 99
        await old.publish(["a"])  # the old writer, still running somewhere
        assert old.superseded
        view = msgspec.json.decode(await reader.read("a", 0), type=BalanceView)
        assert view.balances[0].pending_micros == 5
        old.close()
        new.close()

    _run(servers, test)


async def _writing(client, epoch) -> tuple[FakeShard, BalanceViewWriter, BalanceViewReader, list[bytes]]:
    """A shard of users a and b whose views are written; the keys it wrote."""
    shard = FakeShard(["a", "b"])
    writer = shard.writer(client, epoch)
    await writer.take_over(shard.pending)
    await writer.publish(["a", "b"])
    return shard, writer, BalanceViewReader(client, epoch), [k async for k in client.scan_iter(match=f"dd:{epoch}:*")]


async def _until_view(reader: BalanceViewReader, user: str, pending_micros: int, what: str) -> None:
    """Until reads of `user` answer from a view (the lease lives) showing `pending_micros`."""
    deadline = asyncio.get_running_loop().time() + 5
    while (body := await reader.read(user, 0)) is None or _pending(body) != pending_micros:
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


def test_views_lost_by_redis_are_written_again(servers):
    async def test(client, epoch):
        shard, writer, reader, keys = await _writing(client, epoch)
        await client.delete(*keys)  # Redis restarted without its data
        shard.pending["a"] = 3
        await writer.publish(["a"])  # finds the generation gone: takes a new one, schedules every view
        await _until_view(reader, "b", 0, "the lost views were not written again")
        assert _pending(await reader.read("a", 0)) == 3
        writer.close()

    _run(servers, test)


def test_views_lost_to_an_older_snapshot_are_written_again(servers):
    """Redis restarted from a snapshot older than the shard's last writes (or
    failed over to a replica that lagged) still holds the shard's generation,
    so it cannot tell what it lost; the shard can, from the sequence number
    Redis acknowledged, and writes every view again."""
    async def test(client, epoch):
        shard, writer, reader, keys = await _writing(client, epoch)
        snapshot = {k: await client.dump(k) for k in keys if not k.endswith(b"lease:0")}
        shard.pending["a"] = 4
        await writer.publish(["a"])
        for key, value in snapshot.items():  # the restart: back to the snapshot
            await client.restore(key, 0, value, replace=True)
        assert _pending(await reader.read("a", 0)) == 0  # what a reader would be served now
        # Meanwhile reads go to the shard (no lease), then to the view written again.
        await _until_view(reader, "a", 4, "the lost view stayed stale")
        assert not writer.superseded
        writer.close()

    _run(servers, test)


def test_an_unreachable_redis_fails_nothing(servers):
    async def test(client, epoch):
        dead = redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
        shard = FakeShard(["a"])
        writer = shard.writer(dead, epoch)
        await writer.take_over(shard.pending)  # logs, does not raise: the shard still starts
        await writer.publish(["a"])  # kept for the renewal loop, not raised into a delivery
        assert await BalanceViewReader(dead, epoch).read("a", 0) is None  # the API asks the shard
        writer.close()
        await dead.aclose()

    _run(servers, test)


def test_writes_racing_for_a_generation_take_one(servers):
    async def test(client, epoch):
        shard = FakeShard(["a"])
        writer = shard.writer(client, epoch)
        await writer.take_over([])  # generation 1, nothing to write
        writer._generation = None  # as after Redis lost its data
        # A delivery's write and the renewal loop's lease-only write at once.
        await asyncio.gather(writer.publish(["a"]), writer._write(set()))
        assert int(await client.get(bv.generation_key(epoch, 0))) == 2 and not writer.superseded
        assert await BalanceViewReader(client, epoch).read("a", 0) is not None
        writer.close()

    _run(servers, test)


def test_a_write_that_reaches_redis_late_cannot_undo_a_later_one(servers):
    """A view write the shard gave up on (Redis stalled past its timeout) can
    still reach Redis after the shard wrote a newer view on a new connection.
    Redis then refuses it: the view served stays the newer one."""
    async def test(client, epoch):
        proxy = HoldingProxy(servers[2])
        await proxy.start()
        through_proxy = redis.from_url(proxy.url, socket_timeout=0.3)
        shard = FakeShard(["a"])
        writer = shard.writer(through_proxy, epoch)
        reader = BalanceViewReader(client, epoch)
        try:
            await writer.take_over(shard.pending)
            await writer.publish(["a"])
            proxy.hold()  # the shard's connection stalls
            shard.pending["a"] = 1
            await writer.publish(["a"])  # times out: "a" is kept to be written again
            shard.pending["a"] = 2
            await writer.publish(["a"])  # a new connection: written
            assert _pending(await reader.read("a", 0)) == 2
            assert await proxy.release() == 1  # the stale write (view 1) reaches Redis now
            assert _pending(await reader.read("a", 0)) == 2
            assert not writer.superseded
        finally:
            writer.close()
            await through_proxy.aclose()
            await proxy.close()

    _run(servers, test)


def _pending(body: bytes | None) -> int:
    return msgspec.json.decode(body, type=BalanceView).balances[0].pending_micros
