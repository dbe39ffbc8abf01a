"""Create an API client (a user with a token) and print its token once."""
from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import IntegrityError, transaction

from pipeline_ops.services.tokens import api_token_create

OPERATOR_PERMISSIONS = ["retry_steprun", "cancel_pipelineinput", "view_pipelineinput"]


class Command(BaseCommand):
    help = (
        "Create an API client NAME (a user with an unusable password) and its token, and print the token once: "
        "it is not shown again. Fails if NAME exists."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="The client's name (its username).")
        parser.add_argument(
            "--operator", action="store_true",
            help="Also grant the operators' permissions: retry and cancel inputs, see every client's inputs.",
        )
        parser.add_argument("--json", action="store_true", help='Print {"name", "user_id", "token", "operator"} as one JSON object on stdout.')

    def handle(self, *args, name: str, operator: bool, json: bool = False, **options):
        name = name.strip()
        if not name:
            raise CommandError("The client name must not be empty.")
        User = get_user_model()
        try:
            with transaction.atomic():
                user = User(**{User.USERNAME_FIELD: name})
                user.set_unusable_password()
                user.full_clean(exclude=["password"], validate_unique=False)
                user.save(force_insert=True)  # the unique username decides, not a lookup
                if operator:
                    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="pipeline_ops", codename__in=OPERATOR_PERMISSIONS))
                _, token = api_token_create(user=user)  # stored hashed: this is the only time it is seen
        except IntegrityError:
            raise CommandError(f"An API client (user) named {name!r} already exists.") from None
        except ValidationError as exc:  # a name Django's username validator refuses
            raise CommandError(f"Invalid client name {name!r}: {' '.join(exc.messages)}") from None
        if json:
            import json as json_module

            self.stdout.write(json_module.dumps({"name": name, "user_id": user.pk, "token": token, "operator": operator}))
        else:
            self.stdout.write(token)
        self.stderr.write(f"Created API client {name!r}{' (operator)' if operator else ''}. The token above is shown only once.")
