"""The operations console's pages: inputs (with their attempt timeline), step runs, the
operators' attempt pages (failed, unknown outcome, fenced, stuck) and the audit trail.

Nothing here decides anything: actions parse the request and call ``services.operations``.
Everything is read-only in the ordinary admin sense (records move only through services), and
every list is built to stay fast on 100k+ rows: select_related, no per-row queries, no full
counts, filters whose choices come from settings rather than DISTINCT scans.
"""
from __future__ import annotations

import json
import threading
import uuid
from urllib.parse import quote
from datetime import timedelta

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import F as models_F
from django.db.models import IntegerField, OuterRef, Q, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import Http404, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import mark_safe
from django.utils.text import Truncator

from idempotency.admin import AttemptAdmin as BaseAttemptAdmin
from idempotency.admin import CappedCountPaginator

from ..models import (
    BulkAction, DeadStepRun, FailedAttempt, FencedAttempt, OperatorAction, PipelineInput, RetryingStepRun, StepOutput, StepRun, StuckAttempt,
    UnknownOutcomeAttempt,
)
from ..selectors.steps import step_run_key_parse, step_runs_for_records
from ..services import discard, operations
from ..states import StepStatus
from .actions import confirm_then_run
from .timeline import input_timeline

# "View site" leads to the site's root, which redirects to the dashboard (pipeline_ops/urls.py).
admin.site.site_url = "/"
admin.site.site_header = "pipeline-ops console"
admin.site.site_title = "pipeline-ops"

LIST_TEXT_CHARS = 80  # long payloads and errors are cut in lists; the detail page has them whole


def _short(text: str, chars: int = LIST_TEXT_CHARS) -> str:
    return Truncator(text or "").chars(chars)


def _duration(start, end) -> str:
    if start is None:
        return "—"
    seconds = ((end or timezone.now()) - start).total_seconds()
    text = f"{seconds:.1f} s" if seconds < 120 else (f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h")
    return text if end else f"{text} (running)"


def _duration_text(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else (f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h")


def uuid_prefix_range(term: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """The ids starting with ``term`` (the short ids the lists show, with or without dashes) as
    an id range: one index range scan on both databases (PostgreSQL's uuid order and SQLite's
    hex text order are the same)."""
    digits = term.replace("-", "").lower()
    if not 4 <= len(digits) <= 32 or any(c not in "0123456789abcdef" for c in digits):
        return None
    return uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))


def _json(value, chars: int | None = None) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return _short(text, chars) if chars else text


def _step_state(status: str | None) -> str:
    if not status:
        return "—"
    return format_html('<span class="status status-{}">{}</span>', status.lower(), StepStatus(status).label)


class LiveListMixin:
    """The list polls ``live_view`` and offers a reload when it changed (static/pipeline_ops/live.js)."""

    def changelist_view(self, request, extra_context=None):
        from .live import LISTS

        extra_context = extra_context or {}
        if self.model._meta.model_name in LISTS:
            extra_context["live_url"] = reverse("admin:pipeline_ops_live") + f"?view=list&model={self.model._meta.model_name}"
        return super().changelist_view(request, extra_context)


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

    def has_discard_permission(self, request):
        return request.user.has_perm("pipeline_ops.discard_steprun")


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
class PipelineInputAdmin(LiveListMixin, PermissionMixin, ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("short_id", "pipeline", "status", "client", "created_at", "duration", "attempts", "failed_step", "payload_preview")
    list_filter = ("status", PipelineFilter, CreatedWithinFilter)
    list_select_related = ("submitted_by",)
    search_fields = ("idempotency_key",)
    search_help_text = "An input id or its first characters (the short id shown, at least 4), or an idempotency key or its start."
    ordering = ("-created_at",)
    show_full_result_count = False
    list_per_page = 50
    actions = ["retry_inputs", "force_retry_inputs", "cancel_inputs"]
    change_form_template = "admin/pipeline_ops/pipelineinput/change_form.html"
    readonly_fields = ("id", "pipeline", "status", "submitted_by", "submission_scope", "idempotency_key", "payload_json", "created_at", "updated_at", "finished_at")
    fields = readonly_fields

    def get_urls(self):
        from django.urls import path

        from .dashboard import dashboard_view

        # The dashboard hangs off this admin so it needs no project URL of its own:
        # /admin/pipeline_ops/pipelineinput/dashboard/ (staff only, via admin_view).
        from .live import live_view

        custom = [
            path("dashboard/", self.admin_site.admin_view(dashboard_view), name="pipeline_ops_dashboard"),
            # The small JSON view the console's pages poll for live updates (static/pipeline_ops/live.js).
            path("live/", self.admin_site.admin_view(live_view), name="pipeline_ops_live"),
        ]
        return custom + super().get_urls()

    def get_queryset(self, request):
        attempts = (
            StepRun.objects.filter(input=OuterRef("pk")).order_by().values("input")
            .annotate(total=Sum("attempts_used")).values("total")
        )
        # The step that failed (or is waiting to retry, or was discarded) and its error: two
        # correlated subqueries on the (input, position) index, 50 rows a page.
        broken = StepRun.objects.filter(
            input=OuterRef("pk"), status__in=[StepStatus.FAILED, StepStatus.RETRY_WAIT, StepStatus.DISCARDED]
        ).order_by("position")
        return super().get_queryset(request).annotate(
            attempts_total=Coalesce(Subquery(attempts, output_field=IntegerField()), 0),
            failed_step_name=Subquery(broken.values("step")[:1]),
            failed_step_status=Subquery(broken.values("status")[:1]),
            failed_step_error=Subquery(broken.values("last_error")[:1]),
        )

    def get_search_results(self, request, queryset, search_term):
        # An id or the start of one (the short id the list shows) is an id range; anything is
        # also the start of an idempotency key. Never a LIKE over the payloads.
        term = search_term.strip()
        if not term:
            return queryset, False
        found = Q(idempotency_key__startswith=term)
        ids = uuid_prefix_range(term)
        if ids is not None:
            found |= Q(pk__range=ids)
        return queryset.filter(found), False

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
        return _json(obj.payload, 60)

    @admin.display(description="failed step / last error")
    def failed_step(self, obj):
        if not obj.failed_step_name:
            return "—"
        return format_html("<strong>{}</strong> {} <span class=\"error-text\">{}</span>", obj.failed_step_name,
                           _step_state(obj.failed_step_status), _short(obj.failed_step_error, 90))

    @admin.display(description="payload")
    def payload_json(self, obj):
        return format_html('<pre class="payload-json">{}</pre>', json.dumps(obj.payload, ensure_ascii=False, indent=2, sort_keys=True))

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = extra_context or {}
        try:
            pipeline_input = PipelineInput.objects.get(pk=object_id)
        except (PipelineInput.DoesNotExist, ValueError, Exception):
            pipeline_input = None
        if pipeline_input is not None:
            extra_context["timeline"] = input_timeline(pipeline_input=pipeline_input)
            extra_context["live_url"] = reverse("admin:pipeline_ops_live") + f"?view=input&id={pipeline_input.pk}"
            extra_context["can_retry"] = self.has_retry_permission(request)
            extra_context["can_force_retry"] = self.has_force_retry_permission(request)
            extra_context["can_cancel"] = self.has_cancel_permission(request)
            extra_context["timeline_actions"] = [
                ("retry_inputs", extra_context["can_retry"]),
                ("force_retry_inputs", extra_context["can_force_retry"]),
                ("cancel_inputs", extra_context["can_cancel"]),
            ]
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.action(permissions=["retry"], description="Retry safely (failed and stuck steps; completed ones are skipped)")
    def retry_inputs(self, request, queryset):
        return confirm_then_run(
            self, request, queryset, action_name="retry_inputs", background=(OperatorAction.Action.RETRY, "input", lambda: queryset), title="Retry safely",
            intro="Failed, waiting and stuck steps of the selected inputs are queued again. Completed steps, running "
                  "steps (a live lease) and cancelled inputs are skipped.",
            button="Retry", will=RETRY_WILL,
            plan=lambda targets=queryset: operations.inputs_retry_plan(inputs=targets),
            run=lambda reason: operations.inputs_retry(inputs=queryset, actor=request.user, reason=reason, source="admin"),
        )

    @admin.action(permissions=["force_retry"], description="Forced retry (also fences running attempts)")
    def force_retry_inputs(self, request, queryset):
        return confirm_then_run(
            self, request, queryset, action_name="force_retry_inputs", background=(OperatorAction.Action.FORCE_RETRY, "input", lambda: queryset), title="Forced retry", danger=True,
            intro="As a safe retry, but a step whose attempt holds a live lease is taken away from it: that attempt is "
                  "fenced (its late result will be refused) and a new attempt is queued.",
            button="Force the retry", will=RETRY_WILL,
            plan=lambda targets=queryset: operations.inputs_retry_plan(inputs=targets, force=True),
            run=lambda reason: operations.inputs_retry(inputs=queryset, actor=request.user, reason=reason, source="admin", force=True),
        )

    @admin.action(permissions=["cancel"], description="Cancel inputs (pending steps stop, running ones are fenced)")
    def cancel_inputs(self, request, queryset):
        return confirm_then_run(
            self, request, queryset, action_name="cancel_inputs", background=(OperatorAction.Action.CANCEL, "input", lambda: queryset), title="Cancel inputs", danger=True,
            intro="Pending and queued steps are cancelled; a running step's key is released so its attempt is fenced "
                  "if it finishes. Finished inputs are skipped.",
            button="Cancel the inputs", will=CANCEL_WILL,
            plan=lambda targets=queryset: operations.inputs_cancel_plan(inputs=targets),
            run=lambda reason: operations.inputs_cancel(inputs=queryset, actor=request.user, reason=reason, source="admin"),
        )


# --- step runs ---------------------------------------------------------------------------------


RETRY_WILL = {
    operations.KIND_FAILED: "queued again: its key is reopened and a new attempt runs",
    operations.KIND_WAITING: "queued now instead of at its retry time",
    operations.KIND_STUCK: "the stuck attempt is fenced (TIMED_OUT now, FENCED if it ever finishes); a new attempt is queued",
    operations.KIND_FORCED: "the live attempt is fenced (its late result will be refused); a new attempt is queued",
}
CANCEL_WILL = {operations.KIND_ACTIVE: "cancelled: its pending and queued steps stop; a running attempt is fenced if it finishes"}
RELEASE_WILL = {operations.KIND_STUCK: "lease released: the stuck attempt becomes TIMED_OUT; the step waits, due now, for the reconciler's next pass"}
DISCARD_WILL = {discard.KIND_DEAD: "discarded: it leaves the Dead page and is never retried; the input stays failed"}


def _spread_text() -> str:
    rate = operations.retry_rate_per_second()
    return f" Several steps are spread out at {rate:g} per second (the first goes at once)." if rate > 0 else ""


class StepRunActionsMixin(PermissionMixin):
    """Retry / forced retry / release / discard on any page whose rows lead to step runs."""

    def step_runs_of(self, queryset):
        return queryset

    @admin.action(permissions=["retry"], description="Retry safely (completed and running steps are skipped)")
    def retry_steps(self, request, queryset):
        steps = self.step_runs_of(queryset)
        return confirm_then_run(
            self, request, queryset, action_name="retry_steps", background=(OperatorAction.Action.RETRY, "step_run", lambda: steps), title="Retry safely",
            intro="Failed, waiting and stuck steps are queued again. Completed, running, cancelled, discarded and not yet "
                  "started steps are skipped." + _spread_text(),
            button="Retry", will=RETRY_WILL,
            plan=lambda targets=steps: operations.step_runs_retry_plan(step_runs=targets),
            run=lambda reason: operations.step_runs_retry(step_runs=steps, actor=request.user, reason=reason, source="admin"),
        )

    @admin.action(permissions=["force_retry"], description="Forced retry (fences running attempts)")
    def force_retry_steps(self, request, queryset):
        steps = self.step_runs_of(queryset)
        return confirm_then_run(
            self, request, queryset, action_name="force_retry_steps", background=(OperatorAction.Action.FORCE_RETRY, "step_run", lambda: steps), title="Forced retry", danger=True,
            intro="As a safe retry, but a step whose attempt holds a live lease is taken away from it: that attempt "
                  "is fenced (its late result will be refused) and a new attempt is queued." + _spread_text(),
            button="Force the retry", will=RETRY_WILL,
            plan=lambda targets=steps: operations.step_runs_retry_plan(step_runs=targets, force=True),
            run=lambda reason: operations.step_runs_retry(step_runs=steps, actor=request.user, reason=reason, source="admin", force=True),
        )

    @admin.action(permissions=["release_lease"], description="Release stuck leases (expired leases only)")
    def release_leases(self, request, queryset):
        steps = self.step_runs_of(queryset)
        return confirm_then_run(
            self, request, queryset, action_name="release_leases", background=(OperatorAction.Action.RELEASE_LEASE, "step_run", lambda: steps), title="Release stuck leases", danger=True,
            intro="Keys whose lease expired are taken from their stuck attempt (it is fenced if it ever finishes) and the "
                  "step waits for the reconciler's next pass. Live leases are refused: use a forced retry.",
            button="Release", will=RELEASE_WILL,
            plan=lambda targets=steps: operations.step_runs_release_lease_plan(step_runs=targets),
            run=lambda reason: operations.step_runs_release_lease(step_runs=steps, actor=request.user, reason=reason, source="admin"),
        )

    @admin.action(permissions=["discard"], description="Discard dead steps (give up: never retried)")
    def discard_steps(self, request, queryset):
        steps = self.step_runs_of(queryset)
        return confirm_then_run(
            self, request, queryset, action_name="discard_steps", background=(OperatorAction.Action.DISCARD, "step_run", lambda: steps), title="Discard dead steps", danger=True,
            intro="Steps that failed for good are given up on: each becomes DISCARDED, leaves the Dead page and is never "
                  "retried; its input stays failed. Any other step is skipped.",
            button="Discard", will=DISCARD_WILL,
            plan=lambda targets=steps: discard.step_runs_discard_plan(step_runs=targets),
            run=lambda reason: discard.step_runs_discard(step_runs=steps, actor=request.user, reason=reason, source="admin"),
        )

    # --- one row's buttons: the same confirmation page and audit row, for one step run -----------

    def row_buttons(self, step_run_id, *, retry: bool = True, discard_: bool = False, request_path: str = "") -> str:
        if step_run_id is None:
            return "—"
        buttons = []
        if retry:
            url = reverse("admin:pipeline_ops_steprun_row_retry", args=[step_run_id])
            buttons.append(format_html('<a class="button row-retry" href="{}?next={}">Retry safely…</a>', url, quote(request_path)))
        if discard_:
            url = reverse("admin:pipeline_ops_steprun_row_discard", args=[step_run_id])
            buttons.append(format_html('<a class="button row-discard" href="{}?next={}">Discard…</a>', url, quote(request_path)))
        return mark_safe(" ".join(buttons)) if buttons else "—"  # each part built by format_html


def _row_action_view(modeladmin, request, object_id, *, permission: str, action: str):
    """GET: the confirmation page for one step run; POST (post=yes, a reason): run it, then back
    to the list the button was on (``next``)."""
    if not getattr(modeladmin, f"has_{permission}_permission")(request):
        raise PermissionDenied
    queryset = StepRun.objects.filter(pk=object_id) if str(object_id).isdigit() else StepRun.objects.none()
    if not queryset.exists():
        raise Http404("No such step run.")
    response = getattr(modeladmin, action)(request, queryset)
    if response is not None:
        return response
    target = request.GET.get("next") or ""
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        target = reverse("admin:pipeline_ops_steprun_changelist")
    return HttpResponseRedirect(target or reverse("admin:pipeline_ops_steprun_changelist"))


_rows = threading.local()


class RowButtonsMixin(LiveListMixin):
    """A "do it" column for the lists whose rows lead to a step run (``step_run_pk`` annotated)."""

    row_retry = True
    row_discard = False

    def changelist_view(self, request, extra_context=None):
        # The buttons carry the list's own URL (with its filters) to come back to. Per thread:
        # one ModelAdmin instance serves every request.
        _rows.next_path = request.get_full_path()
        _rows.perms = (self.has_retry_permission(request), self.has_discard_permission(request))
        try:
            response = super().changelist_view(request, extra_context)
            if hasattr(response, "render"):
                response.render()  # the rows are drawn now, while the values above are set
            return response
        finally:
            _rows.next_path, _rows.perms = "", (False, False)

    def get_list_display(self, request):
        shown = list(super().get_list_display(request))
        if (self.row_retry and self.has_retry_permission(request)) or (self.row_discard and self.has_discard_permission(request)):
            shown.insert(1, "row_actions")  # next to the row's name: a long error must not push it off screen
        return shown

    @admin.display(description="act")
    def row_actions(self, obj):
        can_retry, can_discard = getattr(_rows, "perms", (False, False))
        return self.row_buttons(getattr(obj, "step_run_pk", None), retry=self.row_retry and can_retry,
                                discard_=self.row_discard and can_discard, request_path=getattr(_rows, "next_path", ""))


def _input_id_search(queryset, search_term, field="input__pk"):
    """An input id, or its first characters (at least 4), as an id range."""
    term = search_term.strip()
    if not term:
        return queryset, False
    ids = uuid_prefix_range(term)
    return (queryset.filter(**{f"{field}__range": ids}) if ids else queryset.none()), False


class InputPipelineFilter(PipelineFilter):
    def queryset(self, request, queryset):
        return queryset.filter(input__pipeline=self.value()) if self.value() else queryset


@admin.register(StepRun)
class StepRunAdmin(RowButtonsMixin, StepRunActionsMixin, ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("__str__", "input_link", "step", "position", "status", "attempts_used", "next_attempt_at", "updated_at", "error")
    list_filter = ("status", StepNameFilter, InputPipelineFilter)
    list_select_related = ("input",)
    search_fields = ("=input__id",)
    search_help_text = "An input id or its first characters (the short id shown, at least 4)."
    ordering = ("-id",)  # newest first on the primary key: no sort over 300k rows
    show_full_result_count = False
    list_per_page = 50
    actions = ["retry_steps", "force_retry_steps", "release_leases", "discard_steps"]
    readonly_fields = ("input", "step", "position", "status", "attempts_used", "next_attempt_at", "enqueued_at", "started_at",
                       "finished_at", "last_error", "idempotency_record", "created_at", "updated_at")
    fields = readonly_fields

    def get_urls(self):
        rows = [
            path("<path:object_id>/retry/", self.admin_site.admin_view(self.row_retry_view), name="pipeline_ops_steprun_row_retry"),
            path("<path:object_id>/discard/", self.admin_site.admin_view(self.row_discard_view), name="pipeline_ops_steprun_row_discard"),
        ]
        return rows + super().get_urls()

    def row_retry_view(self, request, object_id):
        return _row_action_view(self, request, object_id, permission="retry", action="retry_steps")

    def row_discard_view(self, request, object_id):
        return _row_action_view(self, request, object_id, permission="discard", action="discard_steps")

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(step_run_pk=models_F("pk"))

    def get_search_results(self, request, queryset, search_term):
        return _input_id_search(queryset, search_term)

    @admin.display(description="input", ordering="input__created_at")
    def input_link(self, obj):
        url = reverse("admin:pipeline_ops_pipelineinput_change", args=[obj.input_id])
        return format_html('<a href="{}">{} ({})</a>', url, str(obj.input_id)[:8], obj.input.status)

    @admin.display(description="last error")
    def error(self, obj):
        return _short(obj.last_error)


class _StepRunPageAdmin(RowButtonsMixin, StepRunActionsMixin, ReadOnlyMixin, admin.ModelAdmin):
    """Sidekiq's Retries and Dead sets over step runs (proxy models whose managers filter the status)."""

    list_filter = (StepNameFilter, InputPipelineFilter, CreatedWithinFilter)
    list_select_related = ("input",)
    search_fields = ("=input__id",)
    search_help_text = "An input id or its first characters (the short id shown, at least 4)."
    show_full_result_count = False
    list_per_page = 50
    readonly_fields = StepRunAdmin.readonly_fields
    fields = readonly_fields
    input_link = StepRunAdmin.input_link
    error = StepRunAdmin.error

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(step_run_pk=models_F("pk"))

    def get_search_results(self, request, queryset, search_term):
        return _input_id_search(queryset, search_term)

    @admin.display(description="step run", ordering="pk")
    def step_run(self, obj):
        url = reverse("admin:pipeline_ops_steprun_change", args=[obj.pk])
        return format_html('<a href="{}">#{}</a>', url, obj.pk)


@admin.register(RetryingStepRun)
class RetriesAdmin(_StepRunPageAdmin):
    """Steps waiting for a due retry: the reconciler sends each when due; "Retry safely" sends it now."""

    list_display = ("step_run", "input_link", "step", "attempts_used", "next_attempt_at", "due_in", "error")
    ordering = ("next_attempt_at",)  # (status, next_attempt_at) index: the next due first
    actions = ["retry_steps", "force_retry_steps"]

    @admin.display(description="due", ordering="next_attempt_at")
    def due_in(self, obj):
        if obj.next_attempt_at is None:
            return "—"
        seconds = (obj.next_attempt_at - timezone.now()).total_seconds()
        return f"in {_duration_text(seconds)}" if seconds > 0 else f"overdue by {_duration_text(-seconds)} (the reconciler sends it)"


@admin.register(DeadStepRun)
class DeadAdmin(_StepRunPageAdmin):
    """Steps that failed for good (attempts used up, a permanent error): retry them or discard them."""

    list_display = ("step_run", "input_link", "step", "attempts_used", "finished_at", "error")
    ordering = ("-id",)
    actions = ["retry_steps", "discard_steps"]
    row_discard = True


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


class PipelineAttemptAdmin(RowButtonsMixin, StepRunActionsMixin, BaseAttemptAdmin):
    """An attempt page that knows its step: a link to the input, the step's state now (an attempt
    may have failed on a step that has since succeeded), and actions on the step runs."""

    # No status column: each page is one status.
    list_display = ("attempt", "input_link", "step", "step_now", "worker", "started_at", "duration", "error_summary", "details_preview")
    list_filter = ("status", AttemptStartedWithinFilter)
    actions = ["retry_steps", "force_retry_steps"]
    search_help_text = "A key or its start (an input id's first characters find its steps' attempts), a worker or an error type."

    def get_queryset(self, request):
        # The step run linked to the attempt's key (StepRun.idempotency_record, indexed): one
        # correlated subquery per column, 50 rows a page.
        step = StepRun.objects.filter(idempotency_record_id=OuterRef("record_id"))
        return super().get_queryset(request).annotate(
            step_run_pk=Subquery(step.values("pk")[:1]), step_run_status=Subquery(step.values("status")[:1]),
        )

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(Q(record__key__startswith=term) | Q(worker=term) | Q(error_type=term)), False

    def step_runs_of(self, queryset):
        return step_runs_for_records(record_ids=set(queryset.values_list("record_id", flat=True)))

    @admin.display(description="step now")
    def step_now(self, obj):
        return _step_state(obj.step_run_status)

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
    row_retry = False


@admin.register(StuckAttempt)
class StuckAttemptAdmin(PipelineAttemptAdmin):
    list_filter = ()
    list_display = ("attempt", "input_link", "step", "step_now", "worker", "started_at", "heartbeat_at", "lease_expired_at", "duration")
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



@admin.register(BulkAction)
class BulkActionAdmin(ReadOnlyMixin, admin.ModelAdmin):
    """Operator actions on many targets, worked through in the background (services.bulk): the
    page refreshes itself while one runs; its audit rows are the Operator actions of its batch."""

    change_form_template = "admin/pipeline_ops/bulkaction/change_form.html"
    list_display = ("created_at", "actor_name", "action", "target_type", "progress", "done", "skipped", "status")
    list_filter = ("status", "action")
    ordering = ("-created_at",)
    list_per_page = 50
    readonly_fields = ("created_at", "actor_name", "source", "action", "target_type", "reason", "status", "progress",
                       "done", "skipped", "message", "audit_rows", "started_at", "finished_at", "batch")
    fields = readonly_fields

    @admin.display(description="progress")
    def progress(self, obj):
        return format_html('<progress max="{}" value="{}"></progress> <span data-progress>{} of {}</span>',
                           obj.total, obj.position, obj.position, obj.total)

    @admin.display(description="audit rows")
    def audit_rows(self, obj):
        url = reverse("admin:pipeline_ops_operatoraction_changelist") + f"?q={obj.batch}"
        return format_html('<a href="{}" id="bulk-audit-rows">the Operator actions of this batch</a>', url)


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
