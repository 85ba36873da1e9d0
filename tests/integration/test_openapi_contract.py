"""The engine answers as its OpenAPI document says, for requests generated
from that document by Schemathesis: requests that fit it (positive) and
requests that break it (negative), operation by operation.

Every answer: no 5xx; a status, content type, headers and body the document
gives; a 405 that names what is allowed. Every request that breaks the
document: refused with a 4xx. Requests that fit the document but break a
rule no schema states (an unknown user, a refund past what remains, an
integer written `1.0`) are refused too, so Schemathesis's check that such
requests are accepted is left out.

The examples are derandomized, the same in every run: a failure is one to
reproduce, not a flake.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dailydoco.serve.openapi import openapi_document

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
EXAMPLES_PER_OPERATION = 25
# The document the engine serves at /openapi.json is built by the same code.
OPERATIONS = [result.ok() for result in schemathesis.openapi.from_dict(openapi_document()).get_all_operations()]
# A request breaks the document through a parameter or its body; an
# operation with neither has no negative case.
CASES = [(operation, mode) for operation in OPERATIONS for mode in GenerationMode
         if mode is GenerationMode.POSITIVE or {"parameters", "requestBody"} & set(operation.definition.raw)]


@pytest.mark.parametrize(("operation", "mode"), CASES, ids=[f"{o.label} {m}" for o, m in CASES])
def test_the_engine_answers_as_its_openapi_document_says(operation, mode, engine):
    # The service key only: the admin's payouts and clock moves would reach
    # other tests' users. The admin routes are checked for their 403.
    headers = {"X-API-Key": engine.secrets.service_api_key}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def answers_as_documented(case):
        case.call_and_validate(base_url=engine.url, headers=headers, checks=CHECKS, timeout=60)

    answers_as_documented()
