"""A lane's protocol on real loopback sockets (actors/lane.py); the lane
between Ray actors, and its loss, are in tests/integration/test_lanes.py."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dailydoco.actors.lane import (
    _HEADER,
    _REQUEST,
    LANE_BODY_BYTES_MAX,
    LANE_HOST,
    LaneAddress,
    LaneConnection,
    LaneLost,
    LaneServer,
)
from dailydoco.protocol import CommitOutcomeUnknown, InternalError, ServiceUnavailable


def test_each_answer_goes_to_its_own_call_when_they_finish_out_of_order():
    async def reversed_after(body: bytes) -> bytes:
        await asyncio.sleep(0.001 * (50 - len(body)))  # the later the call, the sooner its answer
        return body[::-1]

    async def scenario():
        lane = await LaneConnection.open(await LaneServer(reversed_after, "node-a").address())
        bodies = [bytes(range(i)) for i in range(50)]
        assert await asyncio.gather(*(lane.call(body) for body in bodies)) == [body[::-1] for body in bodies]
        lane.close()

    asyncio.run(scenario())


def test_the_address_names_the_node_and_a_token_of_its_own():
    async def scenario():
        first = await LaneServer(_echo, "node-a").address()
        second = await LaneServer(_echo, "node-a").address()
        assert first.node_id == "node-a" and first.port != second.port
        assert len(first.token) == 32 and first.token != second.token

    asyncio.run(scenario())


async def _echo(body: bytes) -> bytes:
    return body


@pytest.mark.parametrize(("raised", "heard"), [
    (CommitOutcomeUnknown("the commit's outcome is unknown", retry_after_s=2.0),
     CommitOutcomeUnknown("the commit's outcome is unknown", retry_after_s=2.0)),
    (ConnectionResetError("the database hung up"),
     ServiceUnavailable("a service this request needs did not answer (ConnectionResetError); retry", retry_after_s=1)),
    (ValueError("a bug"), InternalError("the server failed to handle this request; it is logged")),
])
def test_a_failure_reaches_the_caller_as_the_engine_error_the_api_answers(raised, heard, caplog):
    async def failing(body: bytes) -> bytes:
        raise raised

    async def scenario():
        lane = await LaneConnection.open(await LaneServer(failing, "node-a").address())
        with pytest.raises(type(heard)) as caught:
            await lane.call(b"x")
        assert type(caught.value) is type(heard)
        assert (caught.value.detail, caught.value.retry_after_s) == (heard.detail, heard.retry_after_s)
        assert not lane.lost  # a call's failure is the call's, not the lane's
        lane.close()

    with caplog.at_level(logging.ERROR, logger="dailydoco.lane"):
        asyncio.run(scenario())
    # A bug's traceback is logged where it happened; an engine error is no bug.
    assert any(r.exc_info and r.exc_info[1] is raised for r in caplog.records) == isinstance(raised, ValueError)


def test_a_caller_without_the_token_is_hung_up_on_and_runs_nothing():
    ran = []

    async def recorded(body: bytes) -> bytes:
        ran.append(body)
        return body

    async def scenario():
        address = await LaneServer(recorded, "node-a").address()
        stranger = await LaneConnection.open(LaneAddress(address.node_id, address.port, bytes(32)))
        with pytest.raises(LaneLost):
            await stranger.call(b"a purchase")
        assert stranger.lost
        known = await LaneConnection.open(address)
        assert await known.call(b"ours") == b"ours"
        known.close()

    asyncio.run(scenario())
    assert ran == [b"ours"]


def test_a_frame_over_the_limit_is_hung_up_on_before_its_body_is_read():
    async def scenario():
        address = await LaneServer(_echo, "node-a").address()
        reader, writer = await asyncio.open_connection(LANE_HOST, address.port)
        writer.write(address.token + _HEADER.pack(LANE_BODY_BYTES_MAX + 1, 0, _REQUEST))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
        writer.close()

    asyncio.run(scenario())


def test_a_call_whose_caller_leaves_is_finished_and_the_lane_serves_others():
    finished = []

    async def slow(body: bytes) -> bytes:
        await asyncio.sleep(0.2)
        finished.append(body)  # a purchase is written whether or not its caller waits
        return body

    async def scenario():
        address = await LaneServer(slow, "node-a").address()
        leaving = await LaneConnection.open(address)
        call = asyncio.ensure_future(leaving.call(b"left behind"))
        await asyncio.sleep(0.05)
        leaving.close()
        with pytest.raises(LaneLost):
            await call
        staying = await LaneConnection.open(address)
        assert await staying.call(b"next") == b"next"
        staying.close()

    asyncio.run(scenario())
    assert finished == [b"left behind", b"next"]
