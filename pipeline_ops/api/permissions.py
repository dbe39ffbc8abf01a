"""Who may do what through the API: operators' actions need the same permissions as in the admin."""
from __future__ import annotations

from rest_framework.permissions import BasePermission

VIEW_ALL_INPUTS = "pipeline_ops.view_pipelineinput"
RETRY_PERMISSION = "pipeline_ops.retry_steprun"
FORCE_RETRY_PERMISSION = "pipeline_ops.force_retry_steprun"
CANCEL_PERMISSION = "pipeline_ops.cancel_pipelineinput"


def can_see_all_inputs(user) -> bool:
    """Operators see every client's inputs; a client sees only its own."""
    return bool(user and user.is_authenticated and (user.is_staff or user.has_perm(VIEW_ALL_INPUTS)))


class CanRetryInputs(BasePermission):
    message = "Retrying inputs needs the 'retry step runs' permission."

    def has_permission(self, request, view) -> bool:
        return request.user.has_perm(RETRY_PERMISSION)


class CanCancelInputs(BasePermission):
    message = "Cancelling inputs needs the 'cancel pipeline inputs' permission."

    def has_permission(self, request, view) -> bool:
        return request.user.has_perm(CANCEL_PERMISSION)
