#!/usr/bin/env python
"""Django's command-line utility for pipeline-ops."""
import os


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pipeline_ops.settings")
    from pipeline_ops.cli import main as command_line

    command_line()


if __name__ == "__main__":
    main()
