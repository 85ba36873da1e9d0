"""The client of cluster/demo.py against a scripted HTTP server: what it
retries (a 503, the ingress's among them, and a proxy's 5xx) and what it
raises."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from dailydoco.cluster import demo
from dailydoco.cluster.ingress_errors import unavailable_page

ENGINE_ERROR_BODY = json.dumps({"type": "about:blank", "title": "Internal Server Error", "status": 500,
                                "detail": "the server failed to handle this request; it is logged"}).encode()


def _answer(status: int, content_type: str, body: bytes) -> bytes:
    reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 502: "Bad Gateway"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


@pytest.fixture
def scripted_server():
    """A server answering each request with the next of the raw answers it is given."""
    answers: list[bytes] = []
    received: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.wfile.write(answers.pop(0))
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answers, received
    server.shutdown()
    server.server_close()


def test_the_ingress_503_is_retried_with_the_same_body(scripted_server, monkeypatch):
    monkeypatch.setattr(demo, "RETRY_WAIT_MAX_S", 0.01)  # its Retry-After is 1 s
    url, answers, received = scripted_server
    answers += [unavailable_page(), unavailable_page(),
                _answer(200, "application/json", b'{"created": 1, "replayed": 0, "failed": 0}')]
    client = demo.ApiClient(url, "key")
    purchase = [{"transaction_id": "t-1", "user_id": "u-1", "amount_micros": 1_000_000}]
    assert client.purchases(purchase) == {"created": 1, "replayed": 0, "failed": 0}
    assert len(received) == 3 and len(set(received)) == 1


def test_a_proxys_own_5xx_is_retried_with_the_same_body(scripted_server, monkeypatch):
    monkeypatch.setattr(demo, "RETRY_WAIT_UNSAID_S", 0.01)  # they say no Retry-After
    # Serve's default proxy answers so for a request whose replica died
    # holding it (seen when a node was lost: the write had committed).
    url, answers, received = scripted_server
    answers += [_answer(500, "text/plain; charset=utf-8", b"Internal Server Error"),
                _answer(502, "text/html", b"<html><body><h1>502 Bad Gateway</h1></body></html>"),
                _answer(200, "application/json", b'{"created": 0, "replayed": 1, "failed": 0}')]
    client = demo.ApiClient(url, "key")
    purchase = [{"transaction_id": "t-3", "user_id": "u-1", "amount_micros": 1_000_000}]
    assert client.purchases(purchase) == {"created": 0, "replayed": 1, "failed": 0}
    assert len(received) == 3 and len(set(received)) == 1


def test_serves_own_404_is_retried_and_the_engines_is_not(scripted_server, monkeypatch):
    monkeypatch.setattr(demo, "RETRY_WAIT_UNSAID_S", 0.01)
    # Serve's proxy answers so while it knows no routes (its controller
    # restarted, a Ray head replaced): the request reached no replica.
    url, answers, received = scripted_server
    answers += [_answer(404, "text/plain; charset=utf-8", b"Path '/v1/transactions:batch' not found."),
                _answer(200, "application/json", b'{"created": 1, "replayed": 0, "failed": 0}'),
                _answer(404, "application/problem+json", b'{"status": 404, "detail": "no such user"}')]
    client = demo.ApiClient(url, "key")
    purchase = [{"transaction_id": "t-4", "user_id": "u-1", "amount_micros": 1_000_000}]
    assert client.purchases(purchase) == {"created": 1, "replayed": 0, "failed": 0}
    assert len(received) == 2 and len(set(received)) == 1
    with pytest.raises(RuntimeError, match="404"):
        client.purchases(purchase)
    assert len(received) == 3


def test_the_engines_own_500_is_raised_not_retried(scripted_server):
    url, answers, received = scripted_server
    answers += [_answer(500, "application/problem+json", ENGINE_ERROR_BODY)]
    client = demo.ApiClient(url, "key")
    with pytest.raises(RuntimeError, match="500 .*failed to handle this request"):
        client.purchases([{"transaction_id": "t-2", "user_id": "u-1", "amount_micros": 1_000_000}])
    assert len(received) == 1
