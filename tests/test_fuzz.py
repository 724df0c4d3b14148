"""Property-based fuzzing of the HTTP API from its OpenAPI schema (schemathesis): no 5xx, no schema violations.

Bounded for CI by ASIF_FUZZ_EXAMPLES (default 25 per operation).
"""

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
)

from tests.conftest import make_client  # noqa: E402

EXAMPLES = int(os.environ.get("ASIF_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    from index_builder.build import BuildConfig, run_build
    from tests.conftest import HashTextEncoder, PixelEncoder, write_pair_collection

    root = tmp_path_factory.mktemp("fuzz")
    images, pairs = write_pair_collection(root / "data")
    run_build(BuildConfig(pairs=pairs, images_root=images, out=root / "index", k=10), PixelEncoder(), HashTextEncoder())
    with make_client(root / "index") as client:  # runs the lifespan; the app is then ready
        yield client.app


def test_api_never_fails_on_generated_input(fuzz_app):
    """Every operation, EXAMPLES generated requests each (hypothesis driven directly: schemathesis's pytest
    plugin does not support this pytest)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()
        tried.append(operation.label)

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"
            case.validate_response(
                response, checks=[not_a_server_error, response_schema_conformance, content_type_conformance]
            )

        check()
    assert len(tried) >= 14, tried
