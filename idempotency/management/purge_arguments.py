"""The retention commands' shared arguments and their checks (``idempotency_purge`` and any
project command that runs the idempotency log's purge with its own, e.g. ``retention_purge``)."""
from __future__ import annotations

from django.core.management.base import CommandError


def purge_arguments_add(parser, *, rows: str, limit_help: str, history_help: str) -> None:
    """``--dry-run``, ``--older-than``, ``--history-older-than``, ``--batch-size``, ``--limit``, ``--json``.
    ``rows``: what one batch holds; the two helps: what ``--limit`` and ``--history-older-than`` bound."""
    parser.add_argument("--dry-run", action="store_true", help="Count what would be forgotten and deleted; change nothing.")
    parser.add_argument(
        "--older-than", type=float, metavar="HOURS",
        help="Forget finished keys last changed more than HOURS ago, instead of the key retention.",
    )
    parser.add_argument("--history-older-than", type=float, metavar="HOURS", help=history_help)
    parser.add_argument("--batch-size", type=int, metavar="N", help=f"{rows} per transaction (default: IDEMPOTENCY PURGE_BATCH_SIZE).")
    parser.add_argument("--limit", type=int, metavar="N", help=limit_help)
    parser.add_argument("--json", action="store_true", help="Print the summary as one JSON object on stdout.")


def purge_arguments_check(*, older_than, history_older_than, batch_size, limit) -> None:
    """Refuse bad values with a one-line CommandError before anything is read or written."""
    for name, value in (("--older-than", older_than), ("--history-older-than", history_older_than)):
        if value is not None and value < 0:
            raise CommandError(f"{name} must be zero or more hours.")
    if older_than is not None and history_older_than is not None and history_older_than < older_than:
        raise CommandError("--history-older-than must be at least --older-than: the history outlives the key.")
    if batch_size is not None and batch_size < 1:
        raise CommandError("--batch-size must be at least 1.")
    if limit is not None and limit < 1:
        raise CommandError("--limit must be at least 1.")
