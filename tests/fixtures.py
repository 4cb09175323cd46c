"""Real upstream records beside the checkout (`../shared/fixtures`, not shipped in the repository).

A user's clone without them skips the real-record tests, loudly; CI sets LORA_JAX_REQUIRE_FIXTURES=1,
and there a missing folder fails those tests instead of skipping them."""

import os

import pytest

FIXTURES = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))
REQUIRED = os.environ.get("LORA_JAX_REQUIRE_FIXTURES") == "1"


def needs_fixtures(test):
    """Marks a test that reads FIXTURES: skipped without them, failed without them when REQUIRED."""
    if os.path.isdir(FIXTURES):
        return test
    if not REQUIRED:
        return pytest.mark.skip(reason=f"real-record fixtures not found at {FIXTURES}: real-data checks SKIPPED")(test)

    def missing():
        pytest.fail(f"LORA_JAX_REQUIRE_FIXTURES=1 but the real-record fixtures are missing: {FIXTURES}")

    missing.__name__ = test.__name__
    return missing
