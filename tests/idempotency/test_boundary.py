"""The dependency direction ``pipeline_ops -> idempotency -> Django``, never the reverse.

The incident tests (test_incident.py) prove the other half of the boundary: the app does its whole
job with ``tests.testapp.Receipt`` as its only domain model. The subprocess test below goes further
and runs the guard in a project whose INSTALLED_APPS contain no ``pipeline_ops`` at all.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import idempotency

APP_DIR = Path(idempotency.__file__).resolve().parent
FORBIDDEN = "pipeline_ops"


def forbidden_imports(source: str, *, package: str = "idempotency", forbidden: str = FORBIDDEN) -> list[str]:
    """Every import of ``forbidden`` in ``source`` (a module of ``package``): import statements
    anywhere (also inside functions), relative imports resolved against ``package``, and
    ``import_module("...")`` / ``__import__("...")`` calls with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: max(0, len(parts) - (node.level - 1))]
                names = [".".join([*base, node.module] if node.module else base)]
            else:
                names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in {"import_module", "__import__"} and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [name for name in names if name.split(".")[0] == forbidden]
    return sorted(found)


def package_of(path: Path) -> str:
    parts = path.relative_to(APP_DIR.parent).with_suffix("").parts
    return ".".join(parts if path.name == "__init__.py" else parts[:-1]).removesuffix(".__init__")


def test_checker_finds_violation_when_source_imports_pipeline_ops():
    source = (
        "import os\n"
        "from pipeline_ops.models import StepRun\n"
        "def late():\n"
        "    import pipeline_ops.settings\n"
        "    from importlib import import_module\n"
        "    import_module('pipeline_ops.states')\n"
        "from ..pipeline_ops import tasks\n"
        "from .guard import claim\n"
        "import pipeline_ops_extra  # another package that merely shares the prefix\n"
    )

    assert forbidden_imports(source) == [
        "pipeline_ops", "pipeline_ops.models", "pipeline_ops.settings", "pipeline_ops.states",
    ]
    # A relative import resolved from a nested package stays inside the app.
    assert forbidden_imports("from ...guard import claim", package="idempotency.management.commands") == []


def test_no_module_imports_pipeline_ops_when_idempotency_app_is_parsed():
    modules = sorted(APP_DIR.rglob("*.py"))
    assert len(modules) >= 10  # the walk really covers the app (guard, api, models, migrations…)

    violations = {
        str(path.relative_to(APP_DIR)): found
        for path in modules
        if (found := forbidden_imports(path.read_text(encoding="utf-8"), package=package_of(path)))
    }

    assert violations == {}


STANDALONE = r"""
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "idempotency", "tests.testapp"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    USE_TZ=True, DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
)
django.setup()
import sys
from django.core.management import call_command
call_command("migrate", verbosity=0)
from idempotency.api import idempotent
from tests.testapp.models import Receipt
for _ in range(2):
    with idempotent(scope="shop", key="order-1", operation="charge", request={"amount": 5}) as run:
        if not run.replayed:
            run.complete({"receipt": 1}, write=lambda: Receipt.objects.create(key="order-1", amount=5, attempt_number=1))
assert run.replayed and run.result == {"receipt": 1} and Receipt.objects.count() == 1
assert not [m for m in sys.modules if m.split(".")[0] == "pipeline_ops"], "pipeline_ops got imported"
print("standalone ok")
"""


def test_app_runs_without_pipeline_ops_when_installed_alone():
    root = APP_DIR.parent
    done = subprocess.run(
        [sys.executable, "-c", STANDALONE], cwd=root, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "standalone ok"
