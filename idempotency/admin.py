"""Read-only admin pages for the idempotency log. Records change only through the guard."""
from django.contrib import admin

from .models import Attempt, IdempotencyRecord


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class AttemptInline(admin.TabularInline):
    model = Attempt
    extra = 0
    can_delete = False
    fields = ("number", "status", "worker", "started_at", "finished_at", "error_type", "error_message")
    readonly_fields = fields
    ordering = ("number",)
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(ReadOnlyAdmin):
    list_display = ("scope", "key", "operation", "status", "attempt_count", "lease_expires_at", "retry_at", "replay_count", "created_at", "expires_at")
    list_filter = ("status", "scope")
    search_fields = ("key", "scope", "operation")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    inlines = [AttemptInline]


@admin.register(Attempt)
class AttemptAdmin(ReadOnlyAdmin):
    list_display = ("record", "number", "status", "worker", "started_at", "finished_at", "error_type")
    list_filter = ("status",)
    search_fields = ("record__key", "worker", "error_type", "error_message")
    list_select_related = ("record",)
    ordering = ("-started_at",)
    show_full_result_count = False
