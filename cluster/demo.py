"""Fills a running engine with a simulated viral network, over its HTTP API."""

from __future__ import annotations

import logging
import threading
import time

import httpx

from dailydoco.protocol import PROBLEM_MEDIA_TYPE

from .simulator import ViralNetwork

DEMO_BATCH_TRANSACTIONS = 500
HTTP_TIMEOUT_S = 30.0
# Long enough for an embedded server to be started again (`dailydoco up`
# restarts one that dies; a crashed Postgres replays its WAL first).
RETRY_FOR_S = 120.0
RETRY_WAIT_UNSAID_S = 1.0  # after a lost connection, or a 5xx without Retry-After
RETRY_WAIT_MAX_S = 5.0
RETRY_LOG_BODY_CHARS_MAX = 200  # of a retried answer's body, in the line that logs its retry
DEMO_TOKEN_TTL_S = 24 * 3600  # the printed live-page link works for a day

log = logging.getLogger("dailydoco.client")


class ApiClient:
    """A thin synchronous client for backends, scripts and the demo.

    Every call it makes is safe to send again: each write carries its key
    (`user_id`, `transaction_id`), which makes it idempotent. So an answer
    that leaves the request undone or unknown (`retryable`) or a lost
    connection is retried with the same body, after the `Retry-After` the
    engine sends, for up to RETRY_FOR_S; any other error is raised.
    """

    def __init__(self, base_url: str, api_key: str):
        self.http = httpx.Client(base_url=base_url, headers={"X-API-Key": api_key}, timeout=HTTP_TIMEOUT_S)

    def _send(self, method: str, path: str, body: dict | None = None) -> dict:
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                response = self.http.request(method, path, json=body)
            except httpx.TransportError as exc:
                if time.monotonic() >= deadline:
                    raise
                wait_s, why = RETRY_WAIT_UNSAID_S, repr(exc)
            else:
                if not retryable(response) or time.monotonic() >= deadline:
                    return self._ok(response)
                wait_s = _retry_after_s(response)
                why = f"{response.status_code} {response.text[:RETRY_LOG_BODY_CHARS_MAX]}"
            log.warning("%s %s: %s; retrying in %.1f s", method, path, why, wait_s)
            time.sleep(wait_s)

    @staticmethod
    def _ok(response: httpx.Response) -> dict:
        if response.status_code >= 400:
            raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                               f"{response.status_code} {response.text}")
        return response.json()

    def register(self, user_id: str, referral_code: str | None) -> dict:
        body = {"user_id": user_id} | ({"referral_code": referral_code} if referral_code else {})
        return self._send("POST", "/v1/users", body)

    def purchases(self, purchases: list[dict]) -> dict:
        return self._send("POST", "/v1/transactions:batch", {"transactions": purchases})

    def get(self, path: str) -> dict:
        return self._send("GET", path)

    def post(self, path: str, body: dict) -> dict:
        return self._send("POST", path, body)


def retryable(response: httpx.Response) -> bool:
    """Whether an answer leaves its request undone, or its outcome unknown,
    so that the same request sent again finishes it.

    The engine's own: a 503 (its database or cache restarting, a write whose
    commit went unanswered); the ingress's 503 too (no API replica answered:
    cluster/ingress_errors.py). And any 5xx that is not the engine's
    problem+json, but a proxy's in front of it: Serve's default proxy
    answers a plain-text 500 for a request whose replica died holding it (its
    node lost, say), whether or not its write had committed; a load
    balancer's 502 or 504 says as little. The engine's own 500 is a bug,
    which the same request would meet again: that is raised. And a 404
    that is not the engine's problem+json: Serve's proxy answers a plain-text
    404 while it knows no routes, as after its controller was restarted (a
    Ray head replaced, test_head_node_loss.py); the request reached no
    replica.
    """
    if response.status_code == 503:
        return True
    media_type = response.headers.get("content-type", "").partition(";")[0].strip()
    return (response.status_code >= 500 or response.status_code == 404) and media_type != PROBLEM_MEDIA_TYPE


def _retry_after_s(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers["Retry-After"]), 0.0), RETRY_WAIT_MAX_S)
    except (KeyError, ValueError):  # absent, or an HTTP date, which the engine does not send
        return RETRY_WAIT_UNSAID_S


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
    # The network is the same on every start (registrations replay); the
    # purchases are new each time, or a restarted demo would only replay the
    # last one's and no balance would move.
    run = time.strftime("%Y%m%dT%H%M%S-", time.gmtime())
    while not stop.is_set():
        tick = time.monotonic()
        chunk = [{"transaction_id": p.transaction_id, "user_id": p.user_id, "amount_micros": p.amount_micros}
                 for p in network.purchases(batch, run)]
        client.purchases(chunk)
        total += len(chunk)
        if time.monotonic() - last_report >= 5:
            balance = client.get(f"/v1/users/{top}/balance")["balances"]
            print(f"demo: {total} purchases so far; {top}: {balance}", flush=True)
            last_report = time.monotonic()
        stop.wait(max(0.0, batch / purchases_per_s - (time.monotonic() - tick)))
