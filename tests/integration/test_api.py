"""The HTTP API end to end: Serve (HAProxy mode), Ray actors, Postgres."""

from __future__ import annotations

import base64
import concurrent.futures
import time

import msgspec
import pytest

from dailydoco.serve.metrics import REPLICA_METRICS_INTERVAL_S

from .conftest import balance_reads_from, unique

RATES_BP = (2000, 1000, 500, 300, 200, 100, 50)
PROBLEM_BASE = "https://problems.dailydoco.dev/"


def assert_problem(response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == PROBLEM_BASE + slug and body["status"] == status and body["detail"]
    return body


def test_seven_levels_paid_and_eighth_not(api):
    users = api.chain(9)  # root .. buyer's referrer; 8 ancestors above the last
    buyer = users[-1]
    before = {u: api.balance(u)["pending_micros"] for u in users}
    r = api.purchase(buyer, 1_234_567_891)
    assert r.status_code == 201, r.text
    result = r.json()
    ancestors = users[:-1][::-1]  # level 1 first
    assert [c["beneficiary_id"] for c in result["commissions"]] == ancestors[:7]
    assert [c["amount_micros"] for c in result["commissions"]] == [1_234_567_891 * bp // 10_000 for bp in RATES_BP]
    exact_total = 1_234_567_891 * sum(RATES_BP) // 10_000
    assert result["house_micros"] == exact_total - sum(c["amount_micros"] for c in result["commissions"])
    for level, ancestor in enumerate(ancestors, start=1):
        gained = api.balance(ancestor)["pending_micros"] - before[ancestor]
        assert gained == (1_234_567_891 * RATES_BP[level - 1] // 10_000 if level <= 7 else 0)


def test_idempotent_replay_and_conflict(api):
    root, buyer = api.chain(2)
    tid = unique("tx")
    first = api.purchase(buyer, 10_000_000, tid)
    again = api.purchase(buyer, 10_000_000, tid)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["status"] == "replayed" and again.json()["commissions"] == first.json()["commissions"]
    assert_problem(api.purchase(buyer, 10_000_001, tid), 409, "idempotency-conflict")
    assert api.balance(root)["pending_micros"] == 2_000_000


def test_concurrent_duplicates_produce_one_set_of_entries(api):
    root, buyer = api.chain(2)
    tid = unique("tx")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: api.purchase(buyer, 5_000_000, tid), range(32)))
    assert sorted(r.status_code for r in responses) == [200] * 31 + [201]
    assert api.balance(root)["pending_micros"] == 1_000_000
    page = api.service.get(f"/v1/users/{root}/commissions").json()
    assert [e["transaction_id"] for e in page["items"]] == [tid]


def test_batch_mixes_outcomes_per_item(api):
    root, buyer = api.chain(2)
    known = unique("tx")
    assert api.purchase(buyer, 1_000_000, known).status_code == 201
    items = [{"transaction_id": unique("tx"), "user_id": buyer, "amount_micros": 1_000_000} for _ in range(1_500)]
    items += [{"transaction_id": known, "user_id": buyer, "amount_micros": 1_000_000},
              {"transaction_id": unique("tx"), "user_id": "nobody-here", "amount_micros": 1}]
    r = api.service.post("/v1/transactions:batch", json={"transactions": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["created"], body["replayed"], body["failed"]) == (1_500, 1, 1)
    assert body["results"][-1]["problem"]["type"] == PROBLEM_BASE + "unknown-user"
    assert api.balance(root)["pending_micros"] == 1_501 * 200_000


def test_refund_partial_then_rest_then_too_much(api):
    root, buyer = api.chain(2)
    tid = unique("tx")
    api.purchase(buyer, 1_000_001, tid)
    r1 = api.service.post(f"/v1/transactions/{tid}/refunds", json={"refund_id": unique("rf"), "amount_micros": 333_333})
    assert r1.status_code == 201, r1.text
    assert r1.json()["reversals"] == [{"level": 1, "beneficiary_id": root, "amount_micros": -66_666, "kind": "refund"}]
    rest = {"refund_id": unique("rf"), "amount_micros": 666_668}
    r2 = api.service.post(f"/v1/transactions/{tid}/refunds", json=rest)
    assert r2.status_code == 201 and r2.json()["refunded_total_micros"] == 1_000_001
    # Reversals add up to exactly the commission paid: nothing left pending.
    assert api.balance(root)["pending_micros"] == 0
    assert api.service.post(f"/v1/transactions/{tid}/refunds", json=rest).status_code == 200
    too_much = {"refund_id": unique("rf"), "amount_micros": 1}
    assert_problem(api.service.post(f"/v1/transactions/{tid}/refunds", json=too_much), 422, "refund-exceeds-purchase")
    assert_problem(api.service.post("/v1/transactions/nope/refunds", json=too_much), 404, "not-found")


def test_a_refund_keeps_its_reason_and_a_replay_must_give_the_same(api):
    root, buyer = api.chain(2)
    tid = unique("tx")
    api.purchase(buyer, 1_000_000, tid)
    refund = {"refund_id": unique("rf"), "amount_micros": 100_000, "reason": "duplicate charge\nper ticket 42"}
    first = api.service.post(f"/v1/transactions/{tid}/refunds", json=refund)
    assert first.status_code == 201 and first.json()["reason"] == refund["reason"], first.text
    replay = api.service.post(f"/v1/transactions/{tid}/refunds", json=refund)
    assert replay.status_code == 200 and replay.json() == first.json() | {"status": "replayed"}
    assert_problem(api.service.post(f"/v1/transactions/{tid}/refunds", json=refund | {"reason": "another"}),
                   409, "idempotency-conflict")
    assert_problem(api.service.post(f"/v1/transactions/{tid}/refunds", json={k: v for k, v in refund.items()
                                                                             if k != "reason"}),
                   409, "idempotency-conflict")
    # Postgres refuses a NUL in text: refused here, before anything is written.
    assert_problem(api.service.post(f"/v1/transactions/{tid}/refunds",
                                    json={"refund_id": unique("rf"), "amount_micros": 1, "reason": "a\u0000b"}),
                   422, "validation")
    plain = api.service.post(f"/v1/transactions/{tid}/refunds", json={"refund_id": unique("rf"), "amount_micros": 1})
    assert plain.status_code == 201 and plain.json()["reason"] is None
    assert plain.json()["refunded_total_micros"] == 100_001


def together(*calls):
    """Send requests at the same moment; their responses, in order."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def test_concurrent_refunds(api):
    """Refunds sent at the same moment: one refund id for two purchases is
    recorded once and refused (409) for the other; two refunds of one purchase
    that each fit but together exceed it are taken once and refused once."""
    root, buyer = api.chain(2)
    before = api.balance(root)["pending_micros"]

    def refund(tid, refund_id, micros):
        return lambda: api.service.post(f"/v1/transactions/{tid}/refunds",
                                        json={"refund_id": refund_id, "amount_micros": micros})

    for _ in range(4):
        a, b = unique("tx"), unique("tx")
        assert api.purchase(buyer, 1_000_000, a).status_code == 201 and api.purchase(buyer, 1_000_000, b).status_code == 201
        shared = unique("rf")
        responses = together(refund(a, shared, 400_000), refund(b, shared, 400_000))
        assert sorted(r.status_code for r in responses) == [201, 409], [r.text for r in responses]
        assert_problem(next(r for r in responses if r.status_code == 409), 409, "idempotency-conflict")
        responses = together(refund(a, unique("rf"), 600_000), refund(a, unique("rf"), 600_000))
        assert sorted(r.status_code for r in responses) == [201, 422], [r.text for r in responses]
    # Each round pays the referrer 20 % of 2,000,000 bought, less 20 % of the
    # 1,000,000 refunded once: the refused refunds reversed nothing.
    assert api.balance(root)["pending_micros"] - before == 4 * (400_000 - 200_000)


def test_payouts_racing_refunds_pay_what_their_lines_say(api):
    """A payout sent with refunds of approved commissions: every referrer's
    paid balance equals the sum of its payout lines (a payout once marked paid
    the reversals approved while it ran, outside its lines: overpaid)."""
    users = api.chain(4)
    buyer, referrers = users[-1], users[:-1]
    purchases = []
    paid_by_lines = {u: 0 for u in referrers}
    for _ in range(12):
        for _ in range(10):
            purchases.append(unique("tx"))
            assert api.purchase(buyer, 1_000_000, purchases[-1]).status_code == 201
        api.settle()
        assert api.admin.post("/v1/admin/clock", json={"seconds": 31 * 24 * 3600}).status_code == 200
        refunds = [lambda tid=tid: api.service.post(f"/v1/transactions/{tid}/refunds",
                                                    json={"refund_id": unique("rf"), "amount_micros": 50_000})
                   for tid in purchases[-6:]]
        payout, *refunded = together(
            lambda: api.admin.post("/v1/payouts", json={"payout_id": unique("po")}), *refunds)
        assert payout.status_code == 201 and all(r.status_code == 201 for r in refunded), payout.text
        for line in _payout_lines(api, payout.json()["payout_id"]):
            if line["beneficiary_id"] in paid_by_lines:
                paid_by_lines[line["beneficiary_id"]] += line["amount_micros"]
    assert {u: api.balance(u)["paid_micros"] for u in referrers} == paid_by_lines


def _payout_lines(api, payout_id: str, page_lines: int = 7) -> list[dict]:
    """Every line of a payout, paged through GET /v1/payouts/{payout_id}."""
    lines, cursor = [], None
    while True:
        params = {"limit": page_lines} | ({"cursor": cursor} if cursor else {})
        r = api.admin.get(f"/v1/payouts/{payout_id}", params=params)
        assert r.status_code == 200, r.text
        lines += r.json()["lines"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return lines


def test_lifecycle_hold_payout_and_clawback(api):
    root, buyer = api.chain(2)
    tid = unique("tx")
    api.purchase(buyer, 50_000_000, tid)
    assert api.balance(root)["pending_micros"] == 10_000_000
    r = api.admin.post("/v1/admin/clock", json={"seconds": 31 * 24 * 3600})
    assert r.status_code == 200, r.text
    assert api.balance(root)["approved_micros"] == 10_000_000
    payout_id = unique("po")
    payout = api.admin.post("/v1/payouts", json={"payout_id": payout_id, "currency": "USD"})
    assert payout.status_code == 201, payout.text
    lines = _payout_lines(api, payout_id)
    assert {"beneficiary_id": root, "currency": "USD", "amount_micros": 10_000_000} in lines
    assert api.balance(root)["paid_micros"] == 10_000_000
    # The POST answers the first page; GET pages through all, with the same totals.
    view = payout.json()
    assert view["completed_at"] is not None and view["currency"] == "USD"
    assert view["lines"] == lines[:len(view["lines"])]
    assert view["totals"] == [{"currency": "USD", "beneficiaries": len(lines),
                               "amount_micros": sum(x["amount_micros"] for x in lines)}]
    replay = api.admin.post("/v1/payouts", json={"payout_id": payout_id, "currency": "USD"})
    assert replay.status_code == 200 and replay.json() == {**view, "status": "replayed"}, replay.text
    assert_problem(api.admin.post("/v1/payouts", json={"payout_id": payout_id}), 409, "idempotency-conflict")
    assert_problem(api.admin.get(f"/v1/payouts/{unique('po')}"), 404, "not-found")
    assert_problem(api.admin.get(f"/v1/payouts/{payout_id}", params={"cursor": "not-ours"}), 422, "validation")
    assert_problem(api.admin.get(f"/v1/payouts/{payout_id}", params={"limit": 0}), 422, "validation")
    assert_problem(api.service.get(f"/v1/payouts/{payout_id}"), 403, "forbidden")
    # A refund after payout claws back: a negative approved balance, netted next time.
    r = api.service.post(f"/v1/transactions/{tid}/refunds", json={"refund_id": unique("rf"), "amount_micros": 25_000_000})
    assert r.json()["reversals"][0]["kind"] == "clawback"
    after = api.balance(root)
    assert (after["approved_micros"], after["paid_micros"]) == (-5_000_000, 10_000_000)
    assert_problem(api.service.post("/v1/payouts", json={"payout_id": unique("po")}), 403, "forbidden")


def test_registration_rules(api):
    alice = api.register(unique("alice"))
    code = alice["referral_code"]
    # NFKC and case-folding: full-width lower-case letters name the same code.
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if c.isalnum() else c for c in code.lower())
    bob = api.register(unique("bob"), fullwidth)
    assert bob["referrer_id"] == alice["user_id"] and bob["upline"] == [alice["user_id"]]
    assert_problem(api.service.post("/v1/users", json={"user_id": unique("c"), "referral_code": "ZZZZZZZZ"}),
                   422, "unknown-referral-code")
    assert_problem(api.service.post("/v1/users", json={"user_id": alice["user_id"], "referral_code": code}),
                   422, "self-referral")
    assert_problem(api.service.post("/v1/users", json={"user_id": bob["user_id"]}), 409, "idempotency-conflict")
    replay = api.service.post("/v1/users", json={"user_id": bob["user_id"], "referral_code": code})
    assert replay.status_code == 200 and replay.json()["referral_code"] == bob["referral_code"]
    assert bob["status"] == "created" and replay.json()["status"] == "replayed"
    # A read of the record has no delivery to tell of (it said "created" until session 38).
    read = api.service.get(f"/v1/users/{bob['user_id']}").json()
    assert read == {k: v for k, v in bob.items() if k != "status"}


@pytest.mark.parametrize(
    "body, status, slug",
    [
        (b'{"transaction_id": "x", "user_id": "u", "amount_micros": 1', 400, "malformed-body"),
        (b'{"transaction_id": "x", "user_id": "u", "amount_micros": NaN}', 400, "malformed-body"),
        (b'{"transaction_id": "x", "user_id": "u", "amount_micros": 1.5}', 422, "validation"),
        (b'{"transaction_id": "x", "user_id": "u", "amount_micros": 0}', 422, "validation"),
        (b'{"transaction_id": "x", "user_id": "u", "amount_micros": -5}', 422, "validation"),
        (b'{"transaction_id": "x", "user_id": "u", "amount_micros": 1000000000000000000000}', 422, "validation"),
        (b'{"transaction_id": "x", "user_id": "u", "amount_micros": "10"}', 422, "validation"),
        (b'{"transaction_id": "x", "user_id": "u", "amount_micros": 5, "tip": 1}', 422, "validation"),
        (b'{"transaction_id": "x", "user_id": "u", "amount_micros": 5, "currency": "usd"}', 422, "validation"),
        (b'{"transaction_id": "", "user_id": "u", "amount_micros": 5}', 422, "validation"),
        (b'{"transaction_id": "x", "user_id": "nobody", "amount_micros": 5}', 422, "unknown-user"),
    ],
)
def test_bad_purchases_are_rejected_and_write_nothing(api, body, status, slug):
    before = api.admin.get("/v1/admin/house").json()
    r = api.service.post("/v1/transactions", content=body, headers={"content-type": "application/json"})
    assert "regex" not in assert_problem(r, status, slug)["detail"]  # patterns are named in words
    assert api.admin.get("/v1/admin/house").json() == before
    assert api.anonymous.get("/healthz").status_code == 200


def test_what_postgres_would_refuse_is_refused_at_the_edge_and_spares_its_write_group(api):
    """A purchase's row that Postgres refuses fails the whole write group it
    shares. "USD\\n" passed validation (a pattern's `$` matches before a final
    newline) and failed every purchase committed with it, 500s for other
    callers; now it is refused alone."""
    root, buyer = api.chain(2)
    sent = [("USD\n" if i % 10 == 0 else "USD", unique("tx")) for i in range(40)]
    answers = together(*(lambda c=currency, t=tid: api.purchase(buyer, 1_000_000, t, currency=c)
                         for currency, tid in sent))
    for (currency, _), answer in zip(sent, answers, strict=True):
        if currency == "USD":
            assert answer.status_code == 201, answer.text
        else:
            assert_problem(answer, 422, "validation")
    assert api.balance(root)["pending_micros"] == 36 * 200_000
    assert_problem(api.service.post("/v1/users", json={"user_id": unique("nl") + "\n"}), 422, "validation")


def test_ids_in_the_url_that_nothing_can_have_are_not_found(api):
    """404 before any query: Postgres refuses a NUL in text, so those that
    reached it (commissions, refunds, video jobs) were 500s."""
    [user] = api.chain(1)
    for bad in ("%00", "a%0A", "x" * 129, "%C3%A9"):
        for method, path in [("GET", f"/v1/users/{bad}"), ("GET", f"/v1/users/{bad}/balance"),
                             ("GET", f"/v1/users/{bad}/network"), ("GET", f"/v1/users/{bad}/commissions"),
                             ("POST", f"/v1/transactions/{bad}/refunds"), ("GET", f"/v1/videos/{bad}"),
                             ("GET", f"/v1/videos/{bad}/files/thumb.jpg")]:
            body = {"refund_id": unique("rf"), "amount_micros": 1} if method == "POST" else None
            assert_problem(api.service.request(method, path, json=body), 404, "not-found")
    assert api.service.get(f"/v1/users/{user}/commissions").status_code == 200
    assert api.anonymous.get("/readyz").status_code == 200


def test_transport_errors(api):
    assert_problem(api.service.post("/v1/transactions", content=b"{}", headers={"content-type": "text/plain"}),
                   415, "unsupported-media-type")
    huge = b'{"transactions": [' + b'{"transaction_id": "x", "user_id": "u", "amount_micros": 1},' * 80_000 + b"]}"
    assert_problem(api.service.post("/v1/transactions:batch", content=huge,
                                    headers={"content-type": "application/json"}), 413, "payload-too-large")
    too_many = {"transactions": [{"transaction_id": f"x{i}", "user_id": "u", "amount_micros": 1} for i in range(5_001)]}
    assert_problem(api.service.post("/v1/transactions:batch", json=too_many), 422, "validation")
    assert_problem(api.anonymous.get("/v1/nowhere"), 404, "not-found")
    wrong_method = api.service.delete("/v1/transactions")
    assert_problem(wrong_method, 405, "method-not-allowed")
    assert wrong_method.headers["allow"] == "POST"  # required with a 405 (RFC 9110 15.5.6)
    assert set(api.service.put("/healthz").headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert_problem(api.anonymous.get("/v1/users/x/balance"), 401, "unauthorized")
    assert_problem(api.anonymous.get("/v1/users/x/balance", headers={"X-API-Key": "wrong"}), 401, "unauthorized")


def test_user_tokens_read_only_their_own_data(api):
    alice, bob = api.chain(2)
    token = api.service.post(f"/v1/users/{alice}/tokens", json={"ttl_s": 60}).json()["token"]
    as_alice = {"Authorization": f"Bearer {token}"}
    assert api.anonymous.get(f"/v1/users/{alice}/balance", headers=as_alice).status_code == 200
    assert_problem(api.anonymous.get(f"/v1/users/{bob}/balance", headers=as_alice), 403, "forbidden")
    assert_problem(api.anonymous.post("/v1/transactions", headers=as_alice, json={}), 403, "forbidden")
    tampered = token[:-4] + ("AAAA" if token[-4:] != "AAAA" else "BBBB")
    assert_problem(api.anonymous.get(f"/v1/users/{alice}/balance", headers={"Authorization": f"Bearer {tampered}"}),
                   401, "unauthorized")


def test_network_statistics_and_graph(api):
    root = api.register(unique("net"))
    kids = [api.register(unique("kid"), root["referral_code"]) for _ in range(3)]
    grandkid = api.register(unique("gk"), kids[0]["referral_code"])
    api.purchase(grandkid["user_id"], 10_000_000)
    api.settle()
    r = api.service.get(f"/v1/users/{root['user_id']}/network", params={"depth": 2})
    assert r.status_code == 200, r.text
    net = r.json()
    stats = net["stats"]
    assert stats["direct_referrals"] == 3 and stats["network_size"] == 4 and stats["depth"] == 2
    assert stats["size_by_level"][:3] == [3, 1, 0]
    assert stats["revenue_by_level"] == [{"currency": "USD", "revenue_micros_by_level": [0, 10_000_000, 0, 0, 0, 0, 0]}]
    # Members at levels 1..6 (3 kids, 1 grandkid) made 1 referral between them.
    assert stats["viral_coefficient"] == pytest.approx(1 / 4)
    assert len(net["nodes"]) == 5 and {"referrer_id": kids[0]["user_id"], "user_id": grandkid["user_id"]} in net["edges"]
    assert_problem(api.service.get(f"/v1/users/{root['user_id']}/network", params={"depth": 9}), 422, "validation")


def test_commission_paging(api):
    root, buyer = api.chain(2)
    for _ in range(7):
        api.purchase(buyer, 1_000_000)
    seen, cursor = [], None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = api.service.get(f"/v1/users/{root}/commissions", params=params).json()
        seen += [e["entry_id"] for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7
    assert api.service.get(f"/v1/users/{root}/commissions", params={"status": "paid"}).json()["items"] == []
    assert_problem(api.service.get(f"/v1/users/{root}/commissions", params={"cursor": "garbage!"}), 422, "validation")


def _cursor(micros: int, entry_id: int) -> str:
    """A cursor as the server writes one, for a position of our choosing."""
    return base64.urlsafe_b64encode(msgspec.msgpack.encode((micros, entry_id))).decode().rstrip("=")


def test_numbers_and_cursors_in_the_url_that_cannot_be_read_are_422(api):
    """Each of these was a 500 until session 35 (the Unicode digits were read as numbers)."""
    root, buyer = api.chain(2)
    api.purchase(buyer, 1_000_000)
    commissions, network = f"/v1/users/{root}/commissions", f"/v1/users/{root}/network"
    for cursor in (_cursor(10**18, 1), _cursor(-(10**18), 1), _cursor(1, 2**63), _cursor(2**64 - 1, 1)):
        assert_problem(api.service.get(commissions, params={"cursor": cursor}), 422, "validation")
    for limit in ("²", "٣", "５", "9" * 5000):  # str.isdigit() takes them all
        assert_problem(api.service.get(commissions, params={"limit": limit}), 422, "validation")
    assert_problem(api.service.get(network, params={"depth": "9" * 5000}), 422, "validation")
    # Any position in range is a place to page from: the end of the year 9999 comes after every entry.
    latest = api.service.get(commissions, params={"cursor": _cursor(253_402_300_799_999_999, 2**63 - 1)})
    assert latest.status_code == 200 and [e["amount_micros"] for e in latest.json()["items"]] == [200_000]
    assert api.service.get(commissions, params={"limit": "1"}).status_code == 200


def test_operations_endpoints(api):
    ready = api.anonymous.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ok"
    assert {"postgres", "redis", "nats"} <= set(ready.json()["checks"])
    metrics = api.anonymous.get("/metrics").text
    assert "dailydoco_http_requests_total" in metrics
    # One scrape holds every replica's series, whichever replica answers it
    # (each publishes its own every interval from its start): the API's,
    # and the live gateway's, which serves no /metrics of its own.
    replicas = api.engine.config.serve_replicas + api.engine.config.live_replicas
    deadline = time.monotonic() + 5 * REPLICA_METRICS_INTERVAL_S
    while len(_replicas_in(metrics)) < replicas and time.monotonic() < deadline:
        time.sleep(0.2)
        metrics = api.anonymous.get("/metrics").text
    assert len(_replicas_in(metrics)) == replicas
    assert len([line for line in metrics.splitlines()
                if line.startswith("dailydoco_live_connections{")]) == api.engine.config.live_replicas
    # The engine's backlog, read from Postgres (every gauge: it answered in time).
    assert set(api.backlog()) == {"dailydoco_engine_backlog_up", "dailydoco_outbox_rows",
                                  "dailydoco_outbox_oldest_row_age_seconds", "dailydoco_payouts_unfinished",
                                  "dailydoco_ledger_partitions_missing", "dailydoco_ledger_default_partition_rows"}
    spec = api.anonymous.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1") and "/v1/transactions:batch" in spec["paths"]


def test_user_tokens_are_rate_limited_cluster_wide(api):
    alice, bob = api.chain(2, prefix="rl")
    tokens = {u: api.service.post(f"/v1/users/{u}/tokens", json={"ttl_s": 60}).json()["token"] for u in (alice, bob)}
    statuses = [api.anonymous.get(f"/v1/users/{alice}/balance",
                                  headers={"Authorization": f"Bearer {tokens[alice]}"}) for _ in range(200)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited and all(r.status_code in (200, 429) for r in statuses)
    assert int(limited[0].headers["retry-after"]) >= 1
    assert_problem(limited[0], 429, "rate-limited")
    # Another user's budget is their own.
    assert api.anonymous.get(f"/v1/users/{bob}/balance",
                             headers={"Authorization": f"Bearer {tokens[bob]}"}).status_code == 200


def test_balance_reads_come_from_the_shards_views_in_redis(api):
    """The endpoint answers from the view a shard wrote to Redis, and from the
    shard itself where there is none; both give the same body."""
    import asyncio

    import asyncpg
    import redis

    from dailydoco.storage import balance_views

    referrer, buyer = api.chain(2, prefix="view")
    assert api.purchase(buyer, 10_000_000).status_code == 201
    api.settle()  # a delivery returns once the views it changed are written
    engine = api.engine
    epoch = asyncio.run(_fetchval(engine.postgres_url, "SELECT epoch FROM event_epoch", asyncpg))
    key = balance_views.view_key(epoch, referrer)
    client = redis.Redis.from_url(engine.redis_url)
    try:
        stored = client.get(key)
        assert stored is not None and b'"pending_micros":2000000' in stored
        assert api.service.get(f"/v1/users/{referrer}/balance").content == stored
        client.set(key, stored.replace(b"2000000", b"2000001"))  # marked, to see where the answer came from
        assert b'"pending_micros":2000001' in api.service.get(f"/v1/users/{referrer}/balance").content
        # A user's own read: the rate limit and the view in one round trip.
        token = api.service.post(f"/v1/users/{referrer}/tokens", json={"ttl_s": 60}).json()["token"]
        as_user = api.anonymous.get(f"/v1/users/{referrer}/balance", headers={"Authorization": f"Bearer {token}"})
        assert as_user.status_code == 200 and b'"pending_micros":2000001' in as_user.content
        client.delete(key)  # Redis lost it: the shard answers
        before = balance_reads_from(api, "shard")
        from_shard = api.service.get(f"/v1/users/{referrer}/balance")
        assert from_shard.status_code == 200 and from_shard.content == stored
        as_user = api.anonymous.get(f"/v1/users/{referrer}/balance", headers={"Authorization": f"Bearer {token}"})
        assert as_user.status_code == 200 and as_user.content == stored
        # /metrics shows the replicas' counts as they were up to an interval ago.
        deadline = time.monotonic() + 5 * REPLICA_METRICS_INTERVAL_S
        while (counted := balance_reads_from(api, "shard")) < before + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert counted == before + 2
    finally:
        client.close()


def _replicas_in(metrics: str) -> set[str]:
    # A series every replica has from its start, whatever it has served.
    return {line.split('replica="')[1].split('"')[0] for line in metrics.splitlines()
            if line.startswith("dailydoco_balance_reads_total{")}


async def _fetchval(url, query, asyncpg):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()
