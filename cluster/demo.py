"""Fills a running engine with a simulated viral network, over its HTTP API."""

from __future__ import annotations

import threading
import time

import httpx

from .simulator import ViralNetwork

DEMO_BATCH_TRANSACTIONS = 500
HTTP_TIMEOUT_S = 30.0
DEMO_TOKEN_TTL_S = 24 * 3600  # the printed live-page link works for a day


class ApiClient:
    """A thin synchronous client for backends, scripts and the demo."""

    def __init__(self, base_url: str, api_key: str):
        self.http = httpx.Client(base_url=base_url, headers={"X-API-Key": api_key}, timeout=HTTP_TIMEOUT_S)

    def _ok(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                               f"{response.status_code} {response.text}")
        return response.json()

    def register(self, user_id: str, referral_code: str | None) -> dict:
        body = {"user_id": user_id} | ({"referral_code": referral_code} if referral_code else {})
        return self._ok(self.http.post("/v1/users", json=body))

    def purchases(self, purchases: list[dict]) -> dict:
        return self._ok(self.http.post("/v1/transactions:batch", json={"transactions": purchases}))

    def get(self, path: str) -> dict:
        return self._ok(self.http.get(path))

    def post(self, path: str, body: dict) -> dict:
        return self._ok(self.http.post(path, json=body))


def register_network(client: ApiClient, network: ViralNetwork, users: int, stop: threading.Event) -> dict[str, str]:
    """Register `users` more members, or fewer if `stop` is set; returns user id -> referral code."""
    codes: dict[str, str] = {}
    for reg in network.registrations(users):
        if stop.is_set():
            break
        view = client.register(reg.user_id, codes.get(reg.referrer_id) if reg.referrer_id else None)
        codes[reg.user_id] = view["referral_code"]
    return codes


def run_demo(region_urls: dict[str, str], api_key: str, users: int, viral_coefficient: float,
             purchases_per_s: int, stop: threading.Event, seed: int = 1) -> None:
    """Purchases go to the first region's API until `stop` is set; the live
    page is linked in every region."""
    client = ApiClient(next(iter(region_urls.values())), api_key)
    network = ViralNetwork(seed, viral_coefficient, id_prefix=f"demo{seed}-")
    started = time.monotonic()
    register_network(client, network, users, stop)
    if stop.is_set():
        return
    print(f"demo: registered {users} users (viral coefficient {viral_coefficient}) "
          f"in {time.monotonic() - started:.1f}s", flush=True)
    top = max(network.members[: max(1, users // 20)],
              key=lambda u: client.get(f"/v1/users/{u}/network")["stats"]["network_size"])
    token = client.post(f"/v1/users/{top}/tokens", {"ttl_s": DEMO_TOKEN_TTL_S})["token"]
    for region, url in region_urls.items():
        print(f"demo: watch the biggest network live in {region}: {url}/live#token={token}", flush=True)
    total, last_report = 0, time.monotonic()
    batch = max(1, min(DEMO_BATCH_TRANSACTIONS, purchases_per_s))
    while not stop.is_set():
        tick = time.monotonic()
        chunk = [{"transaction_id": p.transaction_id, "user_id": p.user_id, "amount_micros": p.amount_micros}
                 for p in network.purchases(batch)]
        client.purchases(chunk)
        total += len(chunk)
        if time.monotonic() - last_report >= 5:
            balance = client.get(f"/v1/users/{top}/balance")["balances"]
            print(f"demo: {total} purchases so far; {top}: {balance}", flush=True)
            last_report = time.monotonic()
        stop.wait(max(0.0, batch / purchases_per_s - (time.monotonic() - tick)))
