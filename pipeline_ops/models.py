"""Pipeline inputs, their step runs, step outputs (the domain results) and the operators' audit."""
from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

from .states import InputStatus, StepStatus


class PipelineInputQuerySet(models.QuerySet):
    def active(self):
        return self.filter(status__in=[InputStatus.PENDING, InputStatus.RUNNING])

    def failed(self):
        return self.filter(status=InputStatus.FAILED)


class PipelineInput(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False, help_text="The input's id.")
    submitted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="pipeline_inputs",
        help_text="The API client (user) that submitted the input; empty for command-line submissions.",
    )
    submission_scope = models.CharField(
        max_length=100, help_text="Whose idempotency keys this input's key belongs to (e.g. 'client:7', 'cli')."
    )
    idempotency_key = models.CharField(
        max_length=255, blank=True, default="",
        help_text="The submission's Idempotency-Key (or a content hash for file submissions).",
    )
    pipeline = models.CharField(max_length=100, help_text="Name of the pipeline (settings.PIPELINES) the input runs through.")
    payload = models.JSONField(help_text="The submitted input, as received.")
    status = models.CharField(
        max_length=16, choices=InputStatus.choices, default=InputStatus.PENDING,
        help_text="Rolled up from the steps: RUNNING once a step started, SUCCEEDED when all did, FAILED/CANCELLED when one did.",
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True, help_text="When the input was submitted.")
    updated_at = models.DateTimeField(auto_now=True, help_text="Last change.")
    finished_at = models.DateTimeField(null=True, blank=True, help_text="When the input reached a terminal status.")

    objects = PipelineInputQuerySet.as_manager()

    class Meta:
        verbose_name = "pipeline input"
        ordering = ["-created_at"]
        permissions = [("cancel_pipelineinput", "Can cancel pipeline inputs")]
        constraints = [
            # One input per submission key, even if the API's idempotency layer were bypassed.
            models.UniqueConstraint(
                fields=["submission_scope", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="pipeline_input_scope_key_uniq",
            ),
        ]
        indexes = [
            models.Index(fields=["status", "created_at"], name="input_status_created_idx"),
            models.Index(fields=["pipeline", "status"], name="input_pipeline_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.pipeline} input {self.pk}"


class StepRunQuerySet(models.QuerySet):
    def failed(self):
        return self.filter(status=StepStatus.FAILED)

    def due_for_retry(self, *, now):
        return self.filter(status=StepStatus.RETRY_WAIT, next_attempt_at__lte=now)


class StepRun(models.Model):
    input = models.ForeignKey(PipelineInput, on_delete=models.CASCADE, related_name="steps", help_text="The input this step belongs to.")
    step = models.CharField(max_length=100, help_text="The step's name in its pipeline.")
    position = models.PositiveSmallIntegerField(help_text="Order of the step in the pipeline, from 0.")
    status = models.CharField(
        max_length=16, choices=StepStatus.choices, default=StepStatus.PENDING,
        help_text="PENDING until earlier steps succeed; QUEUED once its task is enqueued; RETRY_WAIT between attempts.",
    )
    attempts_used = models.PositiveIntegerField(default=0, help_text="Attempts started for this step (every start counts, crashes too).")
    next_attempt_at = models.DateTimeField(null=True, blank=True, help_text="While waiting to retry: when the next attempt is due.")
    enqueued_at = models.DateTimeField(
        null=True, blank=True, help_text="When a task for this step was last put on the queue (the reconciler uses it to find lost tasks)."
    )
    started_at = models.DateTimeField(null=True, blank=True, help_text="When the first attempt started.")
    finished_at = models.DateTimeField(null=True, blank=True, help_text="When the step reached a terminal status.")
    last_error = models.TextField(blank=True, default="", help_text="The last attempt's error, in one line.")
    idempotency_record = models.ForeignKey(
        "idempotency.IdempotencyRecord", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="The guard's record for this step (scope 'step'); its attempts are this step's attempts.",
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the step run was created (with its input).")
    updated_at = models.DateTimeField(auto_now=True, help_text="Last change.")

    objects = StepRunQuerySet.as_manager()

    class Meta:
        verbose_name = "step run"
        ordering = ["input_id", "position"]
        permissions = [
            ("retry_steprun", "Can retry step runs (safely: completed and running steps are skipped)"),
            ("force_retry_steprun", "Can force a retry of a running step (fences its live attempt)"),
            ("release_lease_steprun", "Can release a stuck lease"),
            ("discard_steprun", "Can discard a dead (terminally failed) step run"),
        ]
        constraints = [
            models.UniqueConstraint(fields=["input", "step"], name="step_run_input_step_uniq"),
            models.UniqueConstraint(fields=["input", "position"], name="step_run_input_position_uniq"),
        ]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="step_run_status_next_idx"),
            models.Index(fields=["status", "enqueued_at"], name="step_run_status_enqueued_idx"),
            models.Index(fields=["step", "status"], name="step_run_step_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.step} of {self.input_id}"

    @property
    def idempotency_key(self) -> str:
        """The step's key in the guard's 'step' scope, also sent to model providers."""
        return f"{self.input_id}:{self.step}"


class StepOutput(models.Model):
    """The domain result of a step: written in the transaction that completes the step's key."""

    step_run = models.OneToOneField(StepRun, on_delete=models.CASCADE, related_name="output", help_text="The step this output belongs to.")
    input = models.ForeignKey(PipelineInput, on_delete=models.CASCADE, related_name="outputs", help_text="The input (denormalised for the unique constraint).")
    step = models.CharField(max_length=100, help_text="The step's name (denormalised for the unique constraint).")
    attempt = models.ForeignKey(
        "idempotency.Attempt", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="The attempt that produced and completed this output.",
    )
    output = models.JSONField(help_text="What the step returned.")
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the output was written.")

    class Meta:
        verbose_name = "step output"
        constraints = [
            # Even a bug in the guard cannot store a step twice.
            models.UniqueConstraint(fields=["input", "step"], name="step_output_input_step_uniq"),
        ]

    def __str__(self) -> str:
        return f"output of {self.step} for {self.input_id}"


class OperatorAction(models.Model):
    """The audit trail: who did what to which object, why, and what changed. One row per target,
    written in the same transaction as the change."""

    class Action(models.TextChoices):
        RETRY = "retry", "Retry"
        FORCE_RETRY = "force_retry", "Forced retry"
        CANCEL = "cancel", "Cancel"
        RELEASE_LEASE = "release_lease", "Release stuck lease"
        DISCARD = "discard", "Discard a dead step"

    class Source(models.TextChoices):
        ADMIN = "admin", "Admin"
        API = "api", "API"
        CLI = "cli", "Command line"

    batch = models.UUIDField(default=uuid.uuid4, db_index=True, help_text="Rows written by one operator request share this id.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True, help_text="When the action was taken.")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="Who took the action.",
    )
    actor_name = models.CharField(max_length=150, blank=True, default="", help_text="The actor's username, kept if the user is deleted.")
    source = models.CharField(max_length=8, choices=Source.choices, help_text="Where the action came from.")
    action = models.CharField(max_length=16, choices=Action.choices, help_text="What was asked for.")
    reason = models.TextField(help_text="Why, in the operator's words (required).")
    target_type = models.CharField(max_length=50, help_text="Kind of object acted on (e.g. 'step_run', 'input').")
    target_id = models.CharField(max_length=64, db_index=True, help_text="Id of the object acted on.")
    before = models.JSONField(default=dict, blank=True, help_text="The object's state before the action.")
    after = models.JSONField(default=dict, blank=True, help_text="The object's state after the action.")
    outcome = models.CharField(max_length=16, help_text="'done', or 'skipped' when nothing was safe to do.")
    message = models.TextField(blank=True, default="", help_text="What happened, or why it was skipped.")

    class Meta:
        verbose_name = "operator action"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.action} {self.target_type} {self.target_id} by {self.actor_name or '?'}"


class BulkAction(models.Model):
    """An operator action on many targets, run in the background (``services.bulk``): planned
    in the request, then worked through by a django-q2 task in slices. Its audit rows are the
    ``OperatorAction`` rows that share its ``batch``."""

    class Status(models.TextChoices):
        QUEUED = "QUEUED", "Queued"
        RUNNING = "RUNNING", "Running"
        DONE = "DONE", "Done"
        FAILED = "FAILED", "Failed"

    batch = models.UUIDField(default=uuid.uuid4, unique=True, help_text="The batch id of its audit rows (Operator actions).")
    action = models.CharField(max_length=16, choices=OperatorAction.Action.choices, help_text="What was asked for.")
    target_type = models.CharField(max_length=50, help_text="'step_run' or 'input'.")
    target_ids = models.JSONField(default=list, help_text="The selected targets, in the order they are worked through.")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", help_text="Who asked.",
    )
    actor_name = models.CharField(max_length=150, blank=True, default="", help_text="The actor's username, kept if the user is deleted.")
    source = models.CharField(max_length=8, choices=OperatorAction.Source.choices, help_text="Where the action came from.")
    reason = models.TextField(help_text="Why, in the operator's words.")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.QUEUED, db_index=True, help_text="Where the run is.")
    position = models.PositiveIntegerField(default=0, help_text="Targets worked through so far.")
    done = models.PositiveIntegerField(default=0, help_text="Targets acted on (from the audit rows).")
    skipped = models.PositiveIntegerField(default=0, help_text="Targets skipped, with their reasons in the audit rows.")
    message = models.TextField(blank=True, default="", help_text="The summary, when done; the error, when failed.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True, help_text="When it was asked for.")
    started_at = models.DateTimeField(null=True, blank=True, help_text="When a worker first took it.")
    finished_at = models.DateTimeField(null=True, blank=True, help_text="When the last target was worked through.")
    # Written by the database's clock (db_default, and Now() in every update): the reconciler
    # compares it with the database's time to find an action whose task was lost.
    updated_at = models.DateTimeField(db_default=Now(), help_text="Last progress: a running action that stops moving is re-sent.")

    class Meta:
        verbose_name = "background action"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.get_action_display()} of {len(self.target_ids)} {self.target_type}s ({self.get_status_display()})"

    @property
    def total(self) -> int:
        return len(self.target_ids)


# --- Operators' own pages over the guard's attempts (proxy models: no tables of their own) ------

from django.utils import timezone  # noqa: E402

from idempotency.models import Attempt, AttemptQuerySet  # noqa: E402
from idempotency.states import AttemptStatus, RecordStatus  # noqa: E402


class _AttemptsWithStatus(models.Manager.from_queryset(AttemptQuerySet)):
    def __init__(self, status: str):
        super().__init__()
        self.status = status

    def deconstruct(self):  # managers built with arguments must say how to rebuild themselves
        return (False, f"{type(self).__module__}.{type(self).__name__}", None, (self.status,), {})

    def get_queryset(self):
        return super().get_queryset().filter(status=self.status)


class _StuckAttempts(models.Manager.from_queryset(AttemptQuerySet)):
    def get_queryset(self):
        # Still RUNNING, but the record's lease ran out: the worker died or stalled.
        return super().get_queryset().filter(
            status=AttemptStatus.RUNNING,
            record__status=RecordStatus.PROCESSING,
            record__lease_expires_at__lt=timezone.now(),
        )


class FailedAttempt(Attempt):
    objects = _AttemptsWithStatus(AttemptStatus.FAILED)

    class Meta:
        proxy = True
        verbose_name = "failed attempt"
        verbose_name_plural = "failed attempts"


class UnknownOutcomeAttempt(Attempt):
    objects = _AttemptsWithStatus(AttemptStatus.UNKNOWN)

    class Meta:
        proxy = True
        verbose_name = "unknown-outcome attempt"
        verbose_name_plural = "unknown-outcome attempts"


class FencedAttempt(Attempt):
    objects = _AttemptsWithStatus(AttemptStatus.FENCED)

    class Meta:
        proxy = True
        verbose_name = "fenced attempt (late write prevented)"
        verbose_name_plural = "fenced attempts (late writes prevented)"


class StuckAttempt(Attempt):
    objects = _StuckAttempts()

    class Meta:
        proxy = True
        verbose_name = "stuck attempt (lease expired)"
        verbose_name_plural = "stuck attempts (lease expired)"


# --- API tokens, stored hashed (issue 13) ----------------------------------------------------------


class ApiToken(models.Model):
    """An API client's token, stored as its SHA-256 digest: the token itself is printed once by
    ``create_api_client`` and cannot be read back from the database or the admin.

    A plain SHA-256 (not a slow password hash) is enough because a token is 160 random bits, not a
    human's password: nobody can guess one from its digest, and lookups stay one indexed query."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens",
                             help_text="The API client (a user) this token authenticates.")
    digest = models.CharField(max_length=64, unique=True, help_text="SHA-256 (hex) of the token; the token itself is not stored.")
    prefix = models.CharField(max_length=8, help_text="The token's first 8 characters, to tell tokens apart (not enough to use one).")
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the token was issued.")

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user_id})"


# --- Sidekiq's Retries and Dead sets, as step-run pages (proxy models with filtering managers) ---------


class _StepRunsWithStatus(models.Manager.from_queryset(StepRunQuerySet)):
    def __init__(self, status: str):
        super().__init__()
        self.status = status

    def get_queryset(self):
        return super().get_queryset().filter(status=self.status)

    def deconstruct(self):  # migrations record the manager's argument
        return (False, f"{type(self).__module__}.{type(self).__name__}", None, (self.status,), {})


class RetryingStepRun(StepRun):
    """Steps waiting for a due retry (RETRY_WAIT): the reconciler sends each when due."""

    objects = _StepRunsWithStatus(StepStatus.RETRY_WAIT)

    class Meta:
        proxy = True
        verbose_name = "retry (step waiting to retry)"
        verbose_name_plural = "retries (steps waiting to retry)"


class DeadStepRun(StepRun):
    """Steps that failed for good (FAILED): nothing retries them unless an operator does."""

    objects = _StepRunsWithStatus(StepStatus.FAILED)

    class Meta:
        proxy = True
        verbose_name = "dead step (failed for good)"
        verbose_name_plural = "dead steps (failed for good)"
