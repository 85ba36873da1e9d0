"""The OpenAPI 3.1 document, generated from the protocol's Structs."""

from __future__ import annotations

import msgspec

from dailydoco import protocol as p
from dailydoco.protocol.video import VideoJobRequest, VideoJobView

BINARY_FILE = {media: {"schema": {"type": "string", "format": "binary"}} for media in ("image/jpeg", "video/mp4")}

# (method, path, summary, request type, response type (a Struct, or BINARY_FILE), auth)
ROUTES = [
    ("post", "/v1/users", "Register a user, optionally under a referral code", p.RegisterUserRequest, p.UserView, "api_key"),
    ("get", "/v1/users/{user_id}", "A user's record", None, p.UserView, "either"),
    ("post", "/v1/users/{user_id}/tokens", "Issue a user token (PASETO v4.public)", p.TokenRequest, p.TokenView, "api_key"),
    ("post", "/v1/users/{user_id}/tokens:revoke", "Revoke every token of the user issued so far", None, p.TokenRevocationView, "either"),
    ("get", "/v1/users/{user_id}/network", "Network statistics and a depth-limited graph", None, p.NetworkView, "either"),
    ("get", "/v1/users/{user_id}/balance", "Balances per currency", None, p.BalanceView, "either"),
    ("get", "/v1/users/{user_id}/commissions", "Commission entries, newest first, cursor-paged", None, p.CommissionPage, "either"),
    ("post", "/v1/transactions", "Record one purchase and pay its commissions", p.TransactionRequest, p.TransactionResult, "api_key"),
    ("post", "/v1/transactions:batch", f"Record up to {p.BATCH_TRANSACTIONS_MAX} purchases", p.TransactionBatchRequest, p.TransactionBatchResult, "api_key"),
    ("post", "/v1/transactions/{transaction_id}/refunds", "Refund a purchase, fully or partly", p.RefundRequest, p.RefundResult, "api_key"),
    ("post", "/v1/payouts", "Pay every positive approved balance (admin)", p.PayoutRequest, p.PayoutResult, "admin"),
    ("post", "/v1/admin/clock", "Move engine time forward (test deployments only)", p.ClockAdvanceRequest, p.ClockView, "admin"),
    ("post", "/v1/videos", "Queue a video analysis: JSON {user_id, path} or the video as the body (?user_id=)", VideoJobRequest, VideoJobView, "api_key"),
    ("get", "/v1/videos/{job_id}", "A video job: status, progress, result", None, VideoJobView, "either"),
    ("get", "/v1/videos/{job_id}/files/{path}", "A thumbnail or platform variant that a done job's result names", None, BINARY_FILE, "either"),
    ("get", "/healthz", "Liveness", None, p.Health, None),
    ("get", "/readyz", "Readiness of every dependency", None, p.Health, None),
]


def openapi_document() -> dict:
    types = {t for r in ROUTES for t in (r[3], r[4]) if isinstance(t, type)} | {p.Problem}
    (_, components) = msgspec.json.schema_components(sorted(types, key=lambda t: t.__name__),
                                                     ref_template="#/components/schemas/{name}")
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    paths: dict = {}
    for method, path, summary, req, resp, auth in ROUTES:
        op: dict = {
            "summary": summary,
            "responses": {
                "200": {"description": "OK", "content": resp if resp is BINARY_FILE else
                        {"application/json": {"schema": {"$ref": f"#/components/schemas/{resp.__name__}"}}}},
                "default": {"description": "Problem (RFC 9457)", "content": problem},
            },
        }
        if req is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{req.__name__}"}}}}
        if auth == "api_key" or auth == "admin":
            op["security"] = [{"ApiKey": []}]
        elif auth == "either":
            op["security"] = [{"ApiKey": []}, {"UserToken": []}]
        params = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
        if params:
            op["parameters"] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in params]
        paths.setdefault(path, {})[method] = op
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
