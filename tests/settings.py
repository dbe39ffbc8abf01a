"""Settings for the test suite: the project's own, plus a tiny test-only app that proves the
idempotency app works in a project that has nothing to do with pipelines."""
import os

os.environ.setdefault("SECRET_KEY", "tests-only-secret-key-not-for-production")

from pipeline_ops.settings import *  # noqa: E402,F403
from pipeline_ops.settings import INSTALLED_APPS  # noqa: E402

INSTALLED_APPS = [*INSTALLED_APPS, "tests.testapp"]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests
