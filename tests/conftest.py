"""Session fixtures: real servers and one real Ray cluster, started once.

DD_POSTGRES_URL / DD_NATS_URL / DD_REDIS_URL point the suite at external
servers (CI runs it both ways); unset, the embedded ones are started.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

import asyncpg
import pytest

from dailydoco.cluster.config import DEFAULT_REGIONS, load_config
from dailydoco.cluster.embedded import EmbeddedServers, free_port
from dailydoco.storage.migrations import apply_migrations
from dailydoco.storage.partitions import ensure_ledger_partitions

# The simulation writes to databases of its own (this name, and one more per
# worker: test_ledger_simulation.py), so it can truncate freely while the
# engine's database keeps the integration tests' data.
SIMULATION_DATABASE = "dailydoco_simulation"


def may_raise_priority() -> bool:
    """Whether this process may lower a niceness: CAP_SYS_NICE (bit 23) among
    its effective capabilities (the live gateway's replicas raise theirs)."""
    with open("/proc/self/status") as status:
        effective = next(line.split()[1] for line in status if line.startswith("CapEff:"))
    return bool(int(effective, 16) >> 23 & 1)


@pytest.fixture(scope="session")
def state_dir():
    with tempfile.TemporaryDirectory(prefix="dailydoco-test-") as d:
        yield d


@pytest.fixture(scope="session")
def embedded_servers(state_dir):
    """The servers the environment names no URL for, started once; embedded
    NATS runs the default regions joined by gateways, as `dailydoco up` does."""
    embedded = EmbeddedServers(state_dir)
    urls = embedded.resolve(os.environ.get("DD_POSTGRES_URL"), os.environ.get("DD_NATS_URL"),
                            os.environ.get("DD_REDIS_URL"), DEFAULT_REGIONS)
    yield embedded, urls
    embedded.stop()


@pytest.fixture(scope="session")
def servers(embedded_servers):
    """(Postgres, NATS, Redis) URLs; the NATS is the home region's."""
    return embedded_servers[1]


@pytest.fixture(scope="session")
def other_region_nats_urls(embedded_servers) -> dict[str, str]:
    """The embedded regions besides the home one; none where NATS is external."""
    return dict(list(embedded_servers[0].nats_urls.items())[1:])


async def _recreate_database(server_url: str, name: str) -> str:
    """A fresh database beside the one `server_url` names; returns its URL."""
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def engine_database_url(servers):
    """The engine's own database: fresh per session, also on external servers."""
    return asyncio.run(_recreate_database(servers[0], f"dailydoco_test_{os.getpid()}"))


# The partitions the upkeep must keep for the engine's month $1 seconds from
# now: it and the $2 after it. Worked out here, apart from the engine's code.
MONTHS_KEPT_SQL = (
    "SELECT 'commission_ledger_' || to_char(date_trunc('month', (now() + make_interval(secs => offset_us / 1e6 + $1))"
    " AT TIME ZONE 'UTC') + make_interval(months => i), 'YYYYMM') FROM engine_clock, generate_series(0, $2) AS i"
    " ORDER BY i"
)


async def migrated_database(server_url: str, name: str) -> str:
    """A fresh database with every migration applied; returns its URL."""
    url = await _recreate_database(server_url, name)
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn)
        await ensure_ledger_partitions(conn)
    finally:
        await conn.close()
    return url


@pytest.fixture(scope="session")
def simulation_database_url(servers):
    return asyncio.run(migrated_database(servers[0], SIMULATION_DATABASE))


@pytest.fixture(scope="session")
def engine(state_dir, servers, other_region_nats_urls, engine_database_url):
    """The whole system on a real local Ray cluster, once per session."""
    from dailydoco.cluster.system import EngineSystem

    _, nats_url, redis_url = servers
    config = load_config(
        state_dir=state_dir,
        postgres_url=engine_database_url,
        nats_url=nats_url,
        redis_url=redis_url,
        http_port=free_port(),
        clock_adjustable=True,
        shard_actors=3,  # more than one of each, so routing across actors is exercised
        chain_actors=2,
        serve_replicas=2,  # and more than one replica: /metrics, revocations and rate limits span them
        namespace=f"dailydoco-test-{os.getpid()}",
        region=DEFAULT_REGIONS[0],
        region_nats_urls=other_region_nats_urls,
    )
    system = EngineSystem(config).start()
    yield system
    system.stop()
