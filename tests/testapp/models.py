"""A domain model that knows nothing of pipelines: proves the idempotency app stands alone."""
from django.db import models


class Receipt(models.Model):
    key = models.CharField(max_length=255, unique=True, help_text="One receipt per idempotency key.")
    amount = models.IntegerField(help_text="What was charged.")
    attempt_number = models.PositiveIntegerField(help_text="The attempt that wrote it.")


class Charge(models.Model):
    """A row the database would accept any number of times for one key: no unique constraint, so
    only the guard's fencing keeps it single (the process race writes this, not a Receipt)."""

    key = models.CharField(max_length=255, db_index=True, help_text="The idempotency key the charge was made under.")
    attempt_number = models.PositiveIntegerField(help_text="The attempt that wrote it.")
