"""The OpenAPI document and the routes the API serves say the same."""

from __future__ import annotations

from dailydoco.serve.app import API_ROUTES
from dailydoco.serve.openapi import ROUTES


def test_the_document_names_every_route_the_api_serves_and_no_other():
    served = {(method.lower(), path.replace(":path}", "}")) for method, path, _, _ in API_ROUTES}
    documented = {(route.method, route.path) for route in ROUTES}
    assert served == documented

