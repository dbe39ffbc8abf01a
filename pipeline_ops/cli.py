"""``manage.py``'s entry point: Django's command line, with database errors told in one line.

Every command of ours validates its own input and fails with a one-line ``CommandError``. What
none of them can validate is the database itself: unreachable, refusing the login, or not
migrated yet. Those end here as one line on stderr (the first line of the driver's message, a
hint when the schema is missing) and exit status 1, instead of a 40-line traceback.
``--traceback`` still shows the whole of it.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    from django.core.management import execute_from_command_line
    from django.db import DatabaseError

    try:
        execute_from_command_line(argv)
    except DatabaseError as exc:
        if "--traceback" in argv:
            raise
        command = argv[1] if len(argv) > 1 else "manage.py"
        sys.stderr.write(f"{command}: {database_error_line(exc)}\n")
        sys.exit(1)


def database_error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "no such table" in first or ("relation" in first and "does not exist" in first):
        return f"the database is not migrated ({first}): run `python manage.py migrate` first"
    return f"database error: {first}"
