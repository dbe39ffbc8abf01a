"""The idempotency log: one record per key, one row per attempt at the key's work."""
from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q

from .states import AttemptStatus, RecordStatus


class IdempotencyRecordQuerySet(models.QuerySet):
    def processing(self):
        return self.filter(status=RecordStatus.PROCESSING)

    def stuck(self, *, now):
        """PROCESSING records whose lease ran out: their worker died or stalled."""
        return self.filter(status=RecordStatus.PROCESSING, lease_expires_at__lt=now)

    def expired(self, *, now):
        """Past the key retention: finished, or failed and left alone for a whole retention
        period after its retry fell due (``fail`` pushes ``expires_at`` past it), so a key whose
        client never came back does not stay forever. Its key may be forgotten; the purge
        deletes it (and its attempts) only once the longer history retention has passed too."""
        return self.filter(expires_at__lt=now, status__in=[RecordStatus.COMPLETED, RecordStatus.FAILED])

    def forgotten(self):
        return self.filter(forgotten_at__isnull=False)


class IdempotencyRecord(models.Model):
    scope = models.CharField(
        max_length=100,
        help_text="Owner namespace of the key (e.g. 'api:client-7' or 'step'): keys never collide across scopes.",
    )
    key = models.CharField(max_length=255, help_text="The idempotency key, unique within its scope.")
    operation = models.CharField(
        max_length=200,
        help_text="What the key was first used for (e.g. 'POST /api/v1/inputs/'); another operation is a mismatch.",
    )
    fingerprint = models.CharField(
        max_length=64,
        help_text="SHA-256 of the canonical request or input; the same key with another fingerprint is a mismatch.",
    )
    status = models.CharField(
        max_length=16,
        choices=RecordStatus.choices,
        default=RecordStatus.PROCESSING,
        help_text="PROCESSING: an attempt holds the key. COMPLETED: the result is stored and replayed. FAILED: see retry at.",
    )
    attempt_count = models.PositiveIntegerField(
        default=0,
        help_text="Attempts started so far. Also the fencing token: only attempt number == this count may complete.",
    )
    lease_expires_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="While PROCESSING: until when the current attempt holds the key. After it, a new attempt may take over.",
    )
    retry_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="While FAILED: when the next attempt may start. Empty means the failure is terminal.",
    )
    result = models.JSONField(null=True, blank=True, help_text="The stored result replayed to every later caller (when COMPLETED).")
    error_summary = models.TextField(blank=True, default="", help_text="The last attempt's error, in one line.")
    replay_count = models.PositiveIntegerField(default=0, help_text="How many later calls were answered from the stored result.")
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the key was first seen.")
    updated_at = models.DateTimeField(auto_now=True, help_text="Last change to this record.")
    completed_at = models.DateTimeField(null=True, blank=True, help_text="When the winning attempt completed the key.")
    expires_at = models.DateTimeField(
        help_text="A key retention after the last move: after this the key is forgotten (its stored result cleared), "
        "and a history retention after the last move the record and its attempts are deleted.",
    )
    forgotten_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the key retention ran out and the purge cleared the stored result: the next claim of this "
        "key runs as new work (attempt numbers go on), while the attempts stay as history. Empty: the key is remembered.",
    )

    objects = IdempotencyRecordQuerySet.as_manager()

    class Meta:
        verbose_name = "idempotency record"
        constraints = [
            # The arbiter of every claim race: insert-or-conflict on this, never check-then-insert.
            models.UniqueConstraint(fields=["scope", "key"], name="idempotency_record_scope_key_uniq"),
            models.CheckConstraint(
                condition=~Q(status=RecordStatus.COMPLETED) | Q(completed_at__isnull=False),
                name="idempotency_record_completed_has_time",
            ),
        ]
        indexes = [
            # Partial: the lease scan only ever looks at PROCESSING records and the retry scan at
            # FAILED ones, and a COMPLETED record (almost all of them) then adds no entry to either
            # index, which keeps the completion's UPDATE cheap.
            models.Index(
                fields=["lease_expires_at"], condition=Q(status=RecordStatus.PROCESSING), name="idem_record_live_lease_idx"
            ),
            models.Index(fields=["retry_at"], condition=Q(status=RecordStatus.FAILED), name="idem_record_retry_due_idx"),
            models.Index(fields=["expires_at"], name="idem_record_expiry_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.scope}/{self.key} ({self.status})"


class AttemptQuerySet(models.QuerySet):
    def fenced(self):
        return self.filter(status=AttemptStatus.FENCED)

    def failed(self):
        return self.filter(status=AttemptStatus.FAILED)

    def unknown(self):
        return self.filter(status=AttemptStatus.UNKNOWN)


class Attempt(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False, help_text="This attempt's own id.")
    record = models.ForeignKey(
        IdempotencyRecord,
        on_delete=models.CASCADE,
        related_name="attempts",
        # The unique (record, number) index starts with record_id and serves every lookup by
        # record: a second index on the column would only cost each claim another write.
        db_index=False,
        help_text="The key this attempt worked on.",
    )
    number = models.PositiveIntegerField(help_text="1, 2, 3… per key; the fencing token this attempt holds.")
    status = models.CharField(
        max_length=16,
        choices=AttemptStatus.choices,
        default=AttemptStatus.RUNNING,
        help_text="RUNNING, SUCCEEDED, FAILED, UNKNOWN (timed out: may have happened), TIMED_OUT (superseded), FENCED (late write refused).",
    )
    worker = models.CharField(max_length=200, blank=True, default="", help_text="Host and process that ran the attempt.")
    started_at = models.DateTimeField(help_text="When the attempt claimed the key.")
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="Last heartbeat that extended the lease.")
    liveness_lock = models.BooleanField(
        default=False,
        help_text=(
            "Set once the attempt holds its PostgreSQL session advisory lock (idempotency.liveness): "
            "while its lease is live, a claimer that finds that lock free knows the holder's session "
            "ended (the process died) and takes over at once. Unset: only the lease says."
        ),
    )
    finished_at = models.DateTimeField(null=True, blank=True, help_text="When the attempt recorded its ending.")
    error_type = models.CharField(max_length=200, blank=True, default="", help_text="Exception class of the failure.")
    error_message = models.TextField(blank=True, default="", help_text="The error message.")
    traceback = models.TextField(blank=True, default="", help_text="Full traceback of the failure, for operators.")
    details = models.JSONField(
        default=dict,
        blank=True,
        help_text="Numbers the work reported about itself (latency, tokens, provider request id…).",
    )

    objects = AttemptQuerySet.as_manager()

    class Meta:
        verbose_name = "attempt"
        ordering = ["record_id", "number"]
        constraints = [
            models.UniqueConstraint(fields=["record", "number"], name="idempotency_attempt_record_number_uniq"),
        ]
        indexes = [
            models.Index(fields=["status", "started_at"], name="idem_attempt_status_idx"),
        ]

    def __str__(self) -> str:
        return f"attempt #{self.number} of {self.record_id} ({self.status})"

    @property
    def duration_seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


class PurgedTally(models.Model):
    """What the retention purge deleted, added up, so that counters read from the log (fenced
    writes, replays) never go backwards when old records go: a counter is the log's count plus
    its tally. One row per (what, label); the purge adds to it in the transaction of its delete."""

    name = models.CharField(max_length=50, help_text=(
        "What was counted: 'attempts' (label: status) or 'replays' (label: scope); an app that purges its own "
        "history may add its names (pipeline_ops: 'inputs' by status, 'step_runs' by step and status)."
    ))
    label = models.CharField(max_length=100, help_text="The status or scope the count is of.")
    value = models.BigIntegerField(default=0, help_text="How many were purged, in all.")

    class Meta:
        verbose_name = "purged tally"
        constraints = [models.UniqueConstraint(fields=["name", "label"], name="idempotency_purged_tally_uniq")]

    def __str__(self) -> str:
        return f"{self.name}[{self.label}] = {self.value}"
