"""Read-only admin pages for the idempotency log. Records change only through the guard.

Generic on purpose (this app knows nothing of pipelines): a project adds its own pages and
actions on top, as ``pipeline_ops.admin`` does with its failed / unknown / fenced / stuck pages.
"""
from django.contrib import admin
from django.core.paginator import Paginator
from django.utils.functional import cached_property
from django.utils import timezone
from django.utils.html import format_html
from django.utils.text import Truncator

from .models import Attempt, IdempotencyRecord
from .states import RecordStatus

LIST_TEXT_CHARS = 80  # long errors and keys are cut in lists; detail pages show them whole


class CappedCountPaginator(Paginator):
    """Counts at most ``COUNT_CAP`` + 1 rows: on a table of millions, an exact COUNT(*) of a
    filter is the slowest query of a change list, and nobody pages past page 200 anyway."""

    COUNT_CAP = 10_000

    @cached_property
    def count(self) -> int:
        return self.object_list[: self.COUNT_CAP + 1].count()


class ReadOnlyAdmin(admin.ModelAdmin):
    paginator = CappedCountPaginator
    show_full_result_count = False
    # "Show counts" would run one COUNT per filter choice over the whole table.
    show_facets = admin.ShowFacets.NEVER
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class LeaseFilter(admin.SimpleListFilter):
    title = "lease"
    parameter_name = "lease"

    def lookups(self, request, model_admin):
        return [("live", "Live (an attempt holds the key)"), ("expired", "Expired (stuck)")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "live":
            return queryset.filter(status=RecordStatus.PROCESSING, lease_expires_at__gte=now)
        if self.value() == "expired":
            return queryset.filter(status=RecordStatus.PROCESSING, lease_expires_at__lt=now)
        return queryset


class AttemptInline(admin.TabularInline):
    model = Attempt
    extra = 0
    can_delete = False
    fields = ("number", "status", "worker", "started_at", "heartbeat_at", "finished_at", "error_type", "error_message", "details")
    readonly_fields = fields
    ordering = ("number",)
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(ReadOnlyAdmin):
    list_display = ("scope", "short_key", "operation", "status", "attempt_count", "lease", "retry_at", "replay_count",
                    "short_fingerprint", "created_at", "expires_at")
    # No "scope" filter: its choices would be a DISTINCT over the whole table on every page.
    # Forgotten: past the key retention, the stored result cleared; the attempts stay as history.
    list_filter = ("status", LeaseFilter, ("forgotten_at", admin.EmptyFieldListFilter))
    search_fields = ("=key",)
    search_help_text = "A key (exact)."
    ordering = ("-id",)  # newest first on the primary key (created_at has no index of its own)
    show_full_result_count = False
    list_per_page = 50
    inlines = [AttemptInline]
    readonly_fields = ("scope", "key", "operation", "fingerprint", "status", "attempt_count", "lease_expires_at", "retry_at",
                       "error_summary", "replay_count", "result", "created_at", "updated_at", "completed_at", "expires_at",
                       "forgotten_at")
    fields = readonly_fields

    @admin.display(description="key", ordering="key")
    def short_key(self, obj):
        return Truncator(obj.key).chars(60)

    @admin.display(description="fingerprint")
    def short_fingerprint(self, obj):
        return obj.fingerprint[:12]

    @admin.display(description="lease")
    def lease(self, obj):
        if obj.status != RecordStatus.PROCESSING or obj.lease_expires_at is None:
            return "—"
        left = (obj.lease_expires_at - timezone.now()).total_seconds()
        if left >= 0:
            return f"live, {left:.0f} s left"
        return format_html('<strong style="color:#c62828">expired {} s ago</strong>', f"{-left:.0f}")


@admin.register(Attempt)
class AttemptAdmin(ReadOnlyAdmin):
    list_display = ("record", "number", "status", "worker", "started_at", "duration", "error_type", "error")
    list_filter = ("status",)
    search_fields = ("=record__key", "=worker", "=error_type")
    search_help_text = "A key, a worker (host:pid) or an error type (exact)."
    list_select_related = ("record",)
    ordering = ("-started_at",)
    show_full_result_count = False
    list_per_page = 50
    readonly_fields = ("id", "record", "number", "status", "worker", "started_at", "heartbeat_at", "finished_at", "duration",
                       "error_type", "error_message", "traceback", "details")
    fields = readonly_fields

    @admin.display(description="duration")
    def duration(self, obj):
        seconds = obj.duration_seconds
        return "running" if seconds is None else f"{seconds:.2f} s"

    @admin.display(description="error")
    def error(self, obj):
        return Truncator(obj.error_message).chars(LIST_TEXT_CHARS)

    @admin.display(description="reported")
    def details_preview(self, obj):
        return Truncator(", ".join(f"{k}={v}" for k, v in (obj.details or {}).items())).chars(LIST_TEXT_CHARS)
