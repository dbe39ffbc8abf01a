"""Settings for the liveness tests' gunicorn (tests/api/test_api_liveness.py): the test suite's
own, plus test-only gated views (tests/api/liveness_urls.py)."""
from tests.settings import *  # noqa: F403

ROOT_URLCONF = "tests.api.liveness_urls"
