"""The OpenAPI 3.1 document, generated from the protocol's Structs.

It says what the handlers do, status by status: a client generated from it
expects the 201 of a purchase, not a 200, and sends the query parameters the
handlers read, within their bounds. `tests/serve/test_openapi.py` checks
it against the routes the app serves (`API_ROUTES`), and
`tests/integration/test_openapi_contract.py`, with Schemathesis, against the
answers the engine gives.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from dailydoco import protocol as p
from dailydoco.protocol.video import VIDEO_UPLOAD_TYPES, VideoJobRequest, VideoJobView

BINARY = {"schema": {"type": "string", "format": "binary"}}
BINARY_FILE = {media: BINARY for media in ("image/jpeg", "video/mp4")}
HOUSE_BALANCES = {"application/json": {"schema": {
    "type": "object", "additionalProperties": {"type": "integer"},
    "description": "The house account's balance in micro-units, per currency"}}}
PROMETHEUS_TEXT = {"text/plain": {"schema": {"type": "string"}}}
OPENAPI_JSON = {"application/json": {"schema": {"type": "object"}}}

# The answers a route gives when it succeeds, by status.
OK = {"200": "OK"}
# A write keyed by the client's id: its first delivery makes it, and any
# later one with the same body replays the original result.
CREATED_OR_REPLAYED = {"201": "Created",
                       "200": "Replayed: the id was used before with the same body; the original result"}
CREATED = {"201": "Created"}
QUEUED = {"202": "Queued: poll the job at the Location header"}
READY_OR_NOT = {"200": "Every dependency answers", "503": "A dependency does not answer: `checks` says which"}

ID_SCHEMA = {"type": "string", "pattern": p.ID_PATTERN, "maxLength": 128}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


COMMISSIONS_QUERY = (
    _query("status", {"type": "string", "enum": list(p.COMMISSION_STATUSES)}, "Only the entries in this status"),
    _query("cursor", {"type": "string", "maxLength": 64}, "The `next_cursor` of the page before"),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": p.COMMISSIONS_PAGE_MAX,
                     "default": p.COMMISSIONS_PAGE_DEFAULT}, "Entries per page"),
)
PAYOUT_QUERY = (
    _query("cursor", {"type": "string", "maxLength": 256}, "The `next_cursor` of the page before"),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": p.PAYOUT_LINES_PAGE_MAX,
                     "default": p.PAYOUT_LINES_PAGE_DEFAULT}, "Lines per page"),
)
NETWORK_QUERY = (
    _query("depth", {"type": "integer", "minimum": 1, "maximum": p.NETWORK_GRAPH_DEPTH_MAX,
                     "default": p.NETWORK_GRAPH_DEPTH_DEFAULT}, "Levels of the graph below the user"),
)
VIDEO_UPLOAD_QUERY = (
    _query("user_id", ID_SCHEMA, "With a video as the body: whose video it is (required then)"),
    _query("variants", {"type": "boolean", "default": False}, "With a video as the body: also encode the variants"),
)


class Route(NamedTuple):
    method: str
    path: str
    summary: str
    request: type | None  # a Struct, sent as JSON
    response: type | dict  # a Struct, answered as JSON, or the content by media type
    success: dict[str, str]
    auth: str | None  # "api_key", "admin", "either" (API key or the user's token), or None
    query: tuple[dict, ...] = ()
    uploads: tuple[str, ...] = ()  # media types the body may also be, raw


ROUTES = [
    Route("post", "/v1/users", "Register a user, optionally under a referral code",
          p.RegisterUserRequest, p.RegistrationResult, CREATED_OR_REPLAYED, "api_key"),
    Route("get", "/v1/users/{user_id}", "A user's record", None, p.UserView, OK, "either"),
    Route("post", "/v1/users/{user_id}/tokens", "Issue a user token (PASETO v4.public)",
          p.TokenRequest, p.TokenView, CREATED, "api_key"),
    Route("post", "/v1/users/{user_id}/tokens:revoke", "Revoke every token of the user issued so far",
          None, p.TokenRevocationView, OK, "either"),
    Route("get", "/v1/users/{user_id}/network", "Network statistics and a depth-limited graph",
          None, p.NetworkView, OK, "either", NETWORK_QUERY),
    Route("get", "/v1/users/{user_id}/balance", "Balances per currency", None, p.BalanceView, OK, "either"),
    Route("get", "/v1/users/{user_id}/commissions", "Commission entries, newest first, cursor-paged",
          None, p.CommissionPage, OK, "either", COMMISSIONS_QUERY),
    Route("post", "/v1/transactions", "Record one purchase and pay its commissions",
          p.TransactionRequest, p.TransactionResult, CREATED_OR_REPLAYED, "api_key"),
    Route("post", "/v1/transactions:batch", f"Record up to {p.BATCH_TRANSACTIONS_MAX} purchases, each with its outcome",
          p.TransactionBatchRequest, p.TransactionBatchResult, OK, "api_key"),
    Route("post", "/v1/transactions/{transaction_id}/refunds", "Refund a purchase, fully or partly",
          p.RefundRequest, p.RefundResult, CREATED_OR_REPLAYED, "api_key"),
    Route("post", "/v1/payouts", "Pay every positive approved balance; answers with the first page of lines (admin)",
          p.PayoutRequest, p.PayoutResult, CREATED_OR_REPLAYED, "admin"),
    Route("get", "/v1/payouts/{payout_id}", "A payout and a page of its lines (admin)",
          None, p.PayoutView, OK, "admin", PAYOUT_QUERY),
    Route("post", "/v1/admin/clock", "Move engine time forward (test deployments only)",
          p.ClockAdvanceRequest, p.ClockView, OK, "admin"),
    Route("get", "/v1/admin/house", "The house account: rounding remainders, per currency",
          None, HOUSE_BALANCES, OK, "admin"),
    Route("post", "/v1/videos", "Queue a video analysis: JSON {user_id, path}, or the video as the body (?user_id=)",
          VideoJobRequest, VideoJobView, QUEUED, "api_key", VIDEO_UPLOAD_QUERY, VIDEO_UPLOAD_TYPES),
    Route("get", "/v1/videos/{job_id}", "A video job: status, progress, result", None, VideoJobView, OK, "either"),
    Route("get", "/v1/videos/{job_id}/files/{path}", "A thumbnail or platform variant that a done job's result names",
          None, BINARY_FILE, OK, "either"),
    Route("get", "/healthz", "Liveness", None, p.Health, OK, None),
    Route("get", "/readyz", "Readiness of every dependency", None, p.Health, READY_OR_NOT, None),
    Route("get", "/metrics", "Prometheus exposition of every replica of the region", None, PROMETHEUS_TEXT, OK, None),
    Route("get", "/openapi.json", "This document", None, OPENAPI_JSON, OK, None),
]


def _path_parameter(name: str) -> dict:
    # The file path of a video output is relative, below the job's folder.
    schema = {"type": "string"} if name == "path" else ID_SCHEMA
    return {"name": name, "in": "path", "required": True, "schema": schema}


def openapi_document() -> dict:
    types = {t for r in ROUTES for t in (r.request, r.response) if isinstance(t, type)} | {p.Problem}
    (_, components) = msgspec.json.schema_components(sorted(types, key=lambda t: t.__name__),
                                                     ref_template="#/components/schemas/{name}")
    problem = {p.PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    paths: dict = {}
    for route in ROUTES:
        content = route.response if isinstance(route.response, dict) else {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{route.response.__name__}"}}}
        op: dict = {
            "summary": route.summary,
            "responses": {
                **{status: {"description": description, "content": content}
                   for status, description in route.success.items()},
                "default": {"description": "Problem (RFC 9457)", "content": problem},
            },
        }
        if route.request is not None:
            body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.request.__name__}"}}}
            op["requestBody"] = {"required": True, "content": body | {media: BINARY for media in route.uploads}}
        if route.auth in ("api_key", "admin"):
            op["security"] = [{"ApiKey": []}]
        elif route.auth == "either":
            op["security"] = [{"ApiKey": []}, {"UserToken": []}]
        parameters = [_path_parameter(seg[1:-1]) for seg in route.path.split("/") if seg.startswith("{")]
        if parameters or route.query:
            op["parameters"] = parameters + list(route.query)
        paths.setdefault(route.path, {})[route.method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "DailyDoco Pro real-time engine", "version": "1.0.0"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "UserToken": {"type": "http", "scheme": "bearer", "bearerFormat": "PASETO v4.public"},
            },
        },
    }
