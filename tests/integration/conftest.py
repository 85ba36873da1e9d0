from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import asyncpg
import httpx
import pytest

from dailydoco.serve.metrics import BACKLOG_READ_EVERY_S

_ids = itertools.count()


def unique(prefix: str) -> str:
    """Ids unique within the session, so tests share one engine safely."""
    return f"{prefix}-{next(_ids)}"


def query(engine, method: str, sql: str, *args):
    """One statement, on a connection of the test's own (the engine's are
    what the fault tests cut); `method` names asyncpg's: fetch, fetchval, execute."""
    async def run():
        conn = await asyncpg.connect(engine.postgres_url)
        try:
            return await getattr(conn, method)(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


class Api:
    def __init__(self, engine):
        self.engine = engine
        self.service = httpx.Client(base_url=engine.url, headers={"X-API-Key": engine.secrets.service_api_key},
                                    timeout=60)
        self.admin = httpx.Client(base_url=engine.url, headers={"X-API-Key": engine.secrets.admin_api_key},
                                  timeout=60)
        self.anonymous = httpx.Client(base_url=engine.url, timeout=60)

    def register(self, user_id: str, referral_code: str | None = None) -> dict:
        body = {"user_id": user_id} | ({"referral_code": referral_code} if referral_code else {})
        r = self.service.post("/v1/users", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def chain(self, length: int, prefix: str = "chain") -> list[str]:
        """Users u0 <- u1 <- ... (each referred by the previous); returns ids, root first."""
        ids, code = [], None
        for _ in range(length):
            view = self.register(unique(prefix), code)
            ids.append(view["user_id"])
            code = view["referral_code"]
        return ids

    def purchase(self, user_id: str, amount_micros: int, transaction_id: str | None = None, **extra) -> httpx.Response:
        body = {"transaction_id": transaction_id or unique("tx"), "user_id": user_id, "amount_micros": amount_micros}
        return self.service.post("/v1/transactions", json=body | extra)

    def settle(self) -> None:
        """Wait until every shard delivery posted so far has landed: purchases
        are acknowledged at commit, and shards are credited right after, by
        the chains, or by the supervisor where it wrote for them."""
        import ray

        from dailydoco.actors.refs import SUPERVISOR_NAME, chain_actor_name

        ns = self.engine.config.namespace
        writers = [chain_actor_name(i) for i in range(self.engine.config.chain_actors)] + [SUPERVISOR_NAME]
        ray.get([ray.get_actor(name, namespace=ns).drained.remote() for name in writers])

    def backlog(self) -> dict[str, float]:
        """The engine's backlog gauges in one scrape of /metrics."""
        metrics = self.anonymous.get("/metrics")
        assert metrics.status_code == 200, metrics.text
        return backlog_gauges(metrics.text)

    def backlog_until(self, seen: Callable[[dict[str, float]], bool]) -> dict[str, float]:
        """Scrape until the backlog is `seen`: each replica reads it anew every BACKLOG_READ_EVERY_S."""
        deadline = time.monotonic() + 2 * BACKLOG_READ_EVERY_S + 5
        while not seen(backlog := self.backlog()):
            assert time.monotonic() < deadline, backlog
            time.sleep(0.2)
        return backlog

    def balance(self, user_id: str, currency: str = "USD") -> dict:
        self.settle()
        r = self.service.get(f"/v1/users/{user_id}/balance")
        assert r.status_code == 200, r.text
        for b in r.json()["balances"]:
            if b["currency"] == currency:
                return b
        return {"pending_micros": 0, "approved_micros": 0, "paid_micros": 0, "earned_micros": 0}


def counted(api: Api, counter: str, **labels: str) -> float:
    """A counter of /metrics with those labels, summed over the replicas (and any other label)."""
    wanted = [f'{name}="{value}"' for name, value in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in api.anonymous.get("/metrics").text.splitlines()
               if line.startswith(f"{counter}{{") and all(label in line for label in wanted))


def balance_reads_from(api: Api, source: str) -> float:
    """The replicas' count of balance reads answered from `source` (redis_view, shard or ledger), summed."""
    return counted(api, "dailydoco_balance_reads_total", source=source)


def backlog_gauges(metrics: str) -> dict[str, float]:
    """The engine's backlog gauges in a /metrics exposition (they have no labels)."""
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
            if line.startswith(("dailydoco_engine_backlog_", "dailydoco_outbox_", "dailydoco_payouts_",
                                "dailydoco_ledger_"))}


def two_regions(api: Api) -> list[tuple[str, str]]:
    """(region, API URL) of the home region and one other; skips where there is no other."""
    regions = list(api.engine.region_urls.items())
    if len(regions) < 2:
        pytest.skip("one region: NATS is external (DD_NATS_URL) and DD_REGION_NATS_URLS names no other")
    return regions[:2]


@pytest.fixture(scope="session")
def api(engine) -> Api:
    return Api(engine)
