"""A domain model that knows nothing of pipelines: proves the idempotency app stands alone."""
from django.db import models


class Receipt(models.Model):
    key = models.CharField(max_length=255, unique=True, help_text="One receipt per idempotency key.")
    amount = models.IntegerField(help_text="What was charged.")
    attempt_number = models.PositiveIntegerField(help_text="The attempt that wrote it.")
