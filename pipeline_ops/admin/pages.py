"""The operations console's pages: inputs (with their attempt timeline), step runs, the
operators' attempt pages (failed, unknown outcome, fenced, stuck) and the audit trail.

Nothing here decides anything: actions parse the request and call ``services.operations``.
Everything is read-only in the ordinary admin sense (records move only through services), and
every list is built to stay fast on 100k+ rows: select_related, no per-row queries, no full
counts, filters whose choices come from settings rather than DISTINCT scans.
"""
from __future__ import annotations

import uuid
from datetime import timedelta

from django.conf import settings
from django.contrib import admin
from django.db.models import IntegerField, OuterRef, Subquery, Sum
from django.db.models.functions import Coalesce
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.text import Truncator

from idempotency.admin import AttemptAdmin as BaseAttemptAdmin
from idempotency.admin import CappedCountPaginator

from ..models import FailedAttempt, FencedAttempt, OperatorAction, PipelineInput, StepRun, StepOutput, StuckAttempt, UnknownOutcomeAttempt
from ..selectors.steps import step_run_key_parse, step_runs_for_records
from ..services import operations
from .actions import confirm_then_run
from .timeline import input_timeline

LIST_TEXT_CHARS = 80  # long payloads and errors are cut in lists; the detail page has them whole


def _short(text: str, chars: int = LIST_TEXT_CHARS) -> str:
    return Truncator(text or "").chars(chars)


def _duration(start, end) -> str:
    if start is None:
        return "—"
    seconds = ((end or timezone.now()) - start).total_seconds()
    text = f"{seconds:.1f} s" if seconds < 120 else (f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h")
    return text if end else f"{text} (running)"


class ReadOnlyMixin:
    paginator = CappedCountPaginator
    # "Show counts" would run one COUNT per filter choice over the whole table.
    show_facets = admin.ShowFacets.NEVER

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class PermissionMixin:
    """``has_<name>_permission`` for the actions' ``permissions=[...]``."""

    def has_retry_permission(self, request):
        return request.user.has_perm("pipeline_ops.retry_steprun")

    def has_force_retry_permission(self, request):
        return request.user.has_perm("pipeline_ops.force_retry_steprun")

    def has_release_lease_permission(self, request):
        return request.user.has_perm("pipeline_ops.release_lease_steprun")

    def has_cancel_permission(self, request):
        return request.user.has_perm("pipeline_ops.cancel_pipelineinput")


# --- filters whose choices cost no query ------------------------------------------------------


class PipelineFilter(admin.SimpleListFilter):
    title = "pipeline"
    parameter_name = "pipeline"

    def lookups(self, request, model_admin):
        return [(name, name) for name in settings.PIPELINES]

    def queryset(self, request, queryset):
        return queryset.filter(pipeline=self.value()) if self.value() else queryset


class StepNameFilter(admin.SimpleListFilter):
    title = "step"
    parameter_name = "step"

    def lookups(self, request, model_admin):
        names = sorted({step for spec in settings.PIPELINES.values() for step in spec["steps"]})
        return [(name, name) for name in names]

    def queryset(self, request, queryset):
        return queryset.filter(step=self.value()) if self.value() else queryset


class CreatedWithinFilter(admin.SimpleListFilter):
    title = "created"
    parameter_name = "created_within"
    windows = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7)}

    def lookups(self, request, model_admin):
        return [("1h", "Last hour"), ("24h", "Last 24 hours"), ("7d", "Last 7 days")]

    def queryset(self, request, queryset):
        window = self.windows.get(self.value() or "")
        return queryset.filter(created_at__gte=timezone.now() - window) if window else queryset


class AttemptStartedWithinFilter(CreatedWithinFilter):
    title = "started"
    parameter_name = "started_within"

    def queryset(self, request, queryset):
        window = self.windows.get(self.value() or "")
        return queryset.filter(started_at__gte=timezone.now() - window) if window else queryset


class ErrorTypeFilter(admin.SimpleListFilter):
    """Filter failed attempts by exception class (Sidekiq's most asked-for filter). The choices
    are one DISTINCT query over the last week's rows of this page, capped at 30."""

    title = "error type"
    parameter_name = "error_type"

    def lookups(self, request, model_admin):
        recent = model_admin.model.objects.filter(started_at__gte=timezone.now() - timedelta(days=7))  # (status, started_at) index
        types = recent.exclude(error_type="").order_by("error_type").values_list("error_type", flat=True).distinct()[:30]
        return [(t, t) for t in types]

    def queryset(self, request, queryset):
        return queryset.filter(error_type=self.value()) if self.value() else queryset


# --- inputs -----------------------------------------------------------------------------------


class StepRunInline(admin.TabularInline):
    model = StepRun
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ("position", "step", "status", "attempts_used", "next_attempt_at", "started_at", "finished_at", "last_error")
    readonly_fields = fields
    ordering = ("position",)

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(PipelineInput)
class PipelineInputAdmin(PermissionMixin, ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("short_id", "pipeline", "status", "client", "created_at", "duration", "attempts", "payload_preview")
    list_filter = ("status", PipelineFilter, CreatedWithinFilter)
    list_select_related = ("submitted_by",)
    search_fields = ("idempotency_key",)
    search_help_text = "An input id (full UUID), or an idempotency key (exact)."
    ordering = ("-created_at",)
    show_full_result_count = False
    list_per_page = 50
    actions = ["retry_inputs", "force_retry_inputs", "cancel_inputs"]
    change_form_template = "admin/pipeline_ops/pipelineinput/change_form.html"
    readonly_fields = ("id", "pipeline", "status", "submitted_by", "submission_scope", "idempotency_key", "payload", "created_at", "updated_at", "finished_at")
    fields = readonly_fields

    def get_urls(self):
        from django.urls import path

        from .dashboard import dashboard_view

        # The dashboard hangs off this admin so it needs no project URL of its own:
        # /admin/pipeline_ops/pipelineinput/dashboard/ (staff only, via admin_view).
        custom = [path("dashboard/", self.admin_site.admin_view(dashboard_view), name="pipeline_ops_dashboard")]
        return custom + super().get_urls()

    def get_queryset(self, request):
        attempts = (
            StepRun.objects.filter(input=OuterRef("pk")).order_by().values("input")
            .annotate(total=Sum("attempts_used")).values("total")
        )
        return super().get_queryset(request).annotate(
            attempts_total=Coalesce(Subquery(attempts, output_field=IntegerField()), 0)
        )

    def get_search_results(self, request, queryset, search_term):
        # A UUID is an input id; anything else an idempotency key. Exact matches only: a LIKE
        # over 100k payloads is not a search an operator wants to wait for.
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(pk=uuid.UUID(term)), False
        except ValueError:
            return queryset.filter(idempotency_key=term), False

    @admin.display(description="input", ordering="pk")
    def short_id(self, obj):
        return str(obj.pk)[:8]

    @admin.display(description="client")
    def client(self, obj):
        return obj.submitted_by.get_username() if obj.submitted_by_id else obj.submission_scope

    @admin.display(description="duration")
    def duration(self, obj):
        return _duration(obj.created_at, obj.finished_at)

    @admin.display(description="attempts used", ordering="attempts_total")
    def attempts(self, obj):
        return obj.attempts_total

    @admin.display(description="payload")
    def payload_preview(self, obj):
        return _short(str(obj.payload), 60)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = extra_context or {}
        try:
            pipeline_input = PipelineInput.objects.get(pk=object_id)
        except (PipelineInput.DoesNotExist, ValueError, Exception):
            pipeline_input = None
        if pipeline_input is not None:
            extra_context["timeline"] = input_timeline(pipeline_input=pipeline_input)
            extra_context["can_retry"] = self.has_retry_permission(request)
            extra_context["can_cancel"] = self.has_cancel_permission(request)
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.action(permissions=["retry"], description="Retry safely (failed and stuck steps; completed ones are skipped)")
    def retry_inputs(self, request, queryset):
        return confirm_then_run(
            self, request, queryset, action_name="retry_inputs", title="Retry safely",
            intro="Failed, waiting and stuck steps of the selected inputs are queued again. Completed steps, running "
                  "steps (a live lease) and cancelled inputs are skipped.",
            button="Retry",
            plan=lambda: operations.inputs_retry_plan(inputs=queryset),
            run=lambda reason: operations.inputs_retry(inputs=queryset, actor=request.user, reason=reason, source="admin"),
        )

    @admin.action(permissions=["force_retry"], description="Forced retry (also fences running attempts)")
    def force_retry_inputs(self, request, queryset):
        return confirm_then_run(
            self, request, queryset, action_name="force_retry_inputs", title="Forced retry", danger=True,
            intro="As a safe retry, but a step whose attempt holds a live lease is taken away from it: that attempt is "
                  "fenced (its late result will be refused) and a new attempt is queued.",
            button="Force the retry",
            plan=lambda: operations.inputs_retry_plan(inputs=queryset, force=True),
            run=lambda reason: operations.inputs_retry(inputs=queryset, actor=request.user, reason=reason, source="admin", force=True),
        )

    @admin.action(permissions=["cancel"], description="Cancel inputs (pending steps stop, running ones are fenced)")
    def cancel_inputs(self, request, queryset):
        return confirm_then_run(
            self, request, queryset, action_name="cancel_inputs", title="Cancel inputs", danger=True,
            intro="Pending and queued steps are cancelled; a running step's key is released so its attempt is fenced "
                  "if it finishes. Finished inputs are skipped.",
            button="Cancel the inputs",
            plan=lambda: operations.inputs_cancel_plan(inputs=queryset),
            run=lambda reason: operations.inputs_cancel(inputs=queryset, actor=request.user, reason=reason, source="admin"),
        )


# --- step runs ---------------------------------------------------------------------------------


class StepRunActionsMixin(PermissionMixin):
    """Retry / forced retry / release on any page whose rows lead to step runs."""

    def step_runs_of(self, queryset):
        return queryset

    @admin.action(permissions=["retry"], description="Retry safely (completed and running steps are skipped)")
    def retry_steps(self, request, queryset):
        steps = self.step_runs_of(queryset)
        return confirm_then_run(
            self, request, queryset, action_name="retry_steps", title="Retry safely",
            intro="Failed, waiting and stuck steps are queued again (spread out at "
                  f"{operations.retry_rate_per_second():g} per second). Completed, running, cancelled and not yet "
                  "started steps are skipped.",
            button="Retry",
            plan=lambda: operations.step_runs_retry_plan(step_runs=steps),
            run=lambda reason: operations.step_runs_retry(step_runs=steps, actor=request.user, reason=reason, source="admin"),
        )

    @admin.action(permissions=["force_retry"], description="Forced retry (fences running attempts)")
    def force_retry_steps(self, request, queryset):
        steps = self.step_runs_of(queryset)
        return confirm_then_run(
            self, request, queryset, action_name="force_retry_steps", title="Forced retry", danger=True,
            intro="As a safe retry, but a step whose attempt holds a live lease is taken away from it: that attempt "
                  "is fenced (its late result will be refused) and a new attempt is queued.",
            button="Force the retry",
            plan=lambda: operations.step_runs_retry_plan(step_runs=steps, force=True),
            run=lambda reason: operations.step_runs_retry(step_runs=steps, actor=request.user, reason=reason, source="admin", force=True),
        )

    @admin.action(permissions=["release_lease"], description="Release stuck leases (expired leases only)")
    def release_leases(self, request, queryset):
        steps = self.step_runs_of(queryset)
        return confirm_then_run(
            self, request, queryset, action_name="release_leases", title="Release stuck leases", danger=True,
            intro="Keys whose lease expired are taken from their stuck attempt (it is fenced if it ever finishes) and the "
                  "step waits for the reconciler's next pass. Live leases are refused: use a forced retry.",
            button="Release",
            plan=lambda: operations.step_runs_release_lease_plan(step_runs=steps),
            run=lambda reason: operations.step_runs_release_lease(step_runs=steps, actor=request.user, reason=reason, source="admin"),
        )


@admin.register(StepRun)
class StepRunAdmin(StepRunActionsMixin, ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("__str__", "input_link", "step", "position", "status", "attempts_used", "next_attempt_at", "updated_at", "error")
    list_filter = ("status", StepNameFilter)
    list_select_related = ("input",)
    search_fields = ("=input__id",)
    search_help_text = "An input id (full UUID)."
    ordering = ("-id",)  # newest first on the primary key: no sort over 300k rows
    show_full_result_count = False
    list_per_page = 50
    actions = ["retry_steps", "force_retry_steps", "release_leases"]
    readonly_fields = ("input", "step", "position", "status", "attempts_used", "next_attempt_at", "enqueued_at", "started_at",
                       "finished_at", "last_error", "idempotency_record", "created_at", "updated_at")
    fields = readonly_fields

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(input_id=uuid.UUID(term)), False
        except ValueError:
            return queryset.none(), False

    @admin.display(description="input", ordering="input__created_at")
    def input_link(self, obj):
        url = reverse("admin:pipeline_ops_pipelineinput_change", args=[obj.input_id])
        return format_html('<a href="{}">{} ({})</a>', url, str(obj.input_id)[:8], obj.input.status)

    @admin.display(description="last error")
    def error(self, obj):
        return _short(obj.last_error)


@admin.register(StepOutput)
class StepOutputAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("input", "step", "attempt", "created_at", "preview")
    list_select_related = ("input",)
    search_fields = ("=input__id",)
    ordering = ("-id",)
    show_full_result_count = False
    list_per_page = 50
    raw_id_fields = ("attempt",)

    def get_search_results(self, request, queryset, search_term):
        try:
            return queryset.filter(input_id=uuid.UUID(search_term.strip())), False
        except ValueError:
            return (queryset.none() if search_term.strip() else queryset), False

    @admin.display(description="output")
    def preview(self, obj):
        return _short(str(obj.output))


# --- the operators' attempt pages ----------------------------------------------------------------


class PipelineAttemptAdmin(StepRunActionsMixin, BaseAttemptAdmin):
    """An attempt page that knows its step: a link to the input, and actions on the step runs."""

    # No status column: each page is one status.
    list_display = ("attempt", "input_link", "step", "worker", "started_at", "duration", "error_summary", "details_preview")
    list_filter = ("status", AttemptStartedWithinFilter)
    actions = ["retry_steps", "force_retry_steps"]

    def step_runs_of(self, queryset):
        return step_runs_for_records(record_ids=set(queryset.values_list("record_id", flat=True)))

    @admin.display(description="attempt", ordering="number")
    def attempt(self, obj):
        return f"#{obj.number}"

    @admin.display(description="error", ordering="error_type")
    def error_summary(self, obj):
        return format_html("<strong>{}</strong> {}", obj.error_type, _short(obj.error_message))

    @admin.display(description="input")
    def input_link(self, obj):
        parsed = step_run_key_parse(key=obj.record.key) if obj.record.scope == "step" else None
        if parsed is None:
            return obj.record.key
        url = reverse("admin:pipeline_ops_pipelineinput_change", args=[parsed[0]])
        return format_html('<a href="{}">{}</a>', url, str(parsed[0])[:8])

    @admin.display(description="step")
    def step(self, obj):
        parsed = step_run_key_parse(key=obj.record.key) if obj.record.scope == "step" else None
        return parsed[1] if parsed else obj.record.operation


@admin.register(FailedAttempt)
class FailedAttemptAdmin(PipelineAttemptAdmin):
    list_filter = (ErrorTypeFilter, AttemptStartedWithinFilter)


@admin.register(UnknownOutcomeAttempt)
class UnknownOutcomeAttemptAdmin(PipelineAttemptAdmin):
    list_filter = (AttemptStartedWithinFilter,)


@admin.register(FencedAttempt)
class FencedAttemptAdmin(PipelineAttemptAdmin):
    list_filter = (AttemptStartedWithinFilter,)
    actions = []  # a fenced attempt's step already has its winner: nothing to retry


@admin.register(StuckAttempt)
class StuckAttemptAdmin(PipelineAttemptAdmin):
    list_filter = ()
    list_display = ("attempt", "input_link", "step", "worker", "started_at", "heartbeat_at", "lease_expired_at", "duration")
    actions = ["release_leases", "retry_steps"]

    @admin.display(description="lease expired at", ordering="record__lease_expires_at")
    def lease_expired_at(self, obj):
        return obj.record.lease_expires_at


# --- the audit trail -------------------------------------------------------------------------------


@admin.register(OperatorAction)
class OperatorActionAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("created_at", "actor_name", "source", "action", "target", "outcome", "short_message", "short_reason")
    list_filter = ("action", "outcome", "source")
    search_fields = ("=target_id", "=actor_name", "=batch")
    search_help_text = "A target id, an actor's username or a batch id (exact)."
    ordering = ("-created_at",)
    show_full_result_count = False
    list_per_page = 100
    readonly_fields = ("created_at", "batch", "actor", "actor_name", "source", "action", "reason", "target_type", "target_link",
                       "before", "after", "outcome", "message")
    fields = readonly_fields

    @admin.display(description="target")
    def target(self, obj):
        return f"{obj.target_type} {obj.target_id[:12]}"

    @admin.display(description="target")
    def target_link(self, obj):
        name = {"input": "pipelineinput", "step_run": "steprun"}.get(obj.target_type)
        if name is None:
            return f"{obj.target_type} {obj.target_id}"
        url = reverse(f"admin:pipeline_ops_{name}_change", args=[obj.target_id])
        return format_html('<a href="{}">{} {}</a>', url, obj.target_type, obj.target_id)

    @admin.display(description="message")
    def short_message(self, obj):
        return _short(obj.message, 60)

    @admin.display(description="reason")
    def short_reason(self, obj):
        return _short(obj.reason, 60)



# --- API tokens: stored hashed, never shown -------------------------------------------------------------

from rest_framework.authtoken.admin import TokenProxy  # noqa: E402

from ..models import ApiToken  # noqa: E402

if admin.site.is_registered(TokenProxy):
    # DRF's page listed every client's token in full; tokens are now stored hashed (ApiToken)
    # and DRF's table stays empty (migration 0004 hashed and deleted the old rows).
    admin.site.unregister(TokenProxy)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Who holds a token and since when; the token itself is not stored. Issue one with
    ``manage.py create_api_client NAME``; delete the row to revoke it."""

    list_display = ("prefix_shown", "user", "created_at")
    list_select_related = ("user",)
    search_fields = ("=user__username", "prefix")
    readonly_fields = ("user", "prefix_shown", "created_at")
    fields = readonly_fields
    ordering = ("-created_at",)

    @admin.display(description="token")
    def prefix_shown(self, obj):
        return f"{obj.prefix}… (the rest is not stored)"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
