"""Dangerous admin actions in the shape of Django's ``delete_selected``: permission-gated, a
confirmation page that lists what will and will not happen and asks for a reason, a ``log_change``
per object acted on, and one counted message. The rules live in ``services.operations``."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from django import forms
from django.contrib import messages
from django.contrib.admin import helpers
from django.db.models import QuerySet
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from ..services import bulk
from ..services.operations import ActionReport, Decision, _pks

# A confirmation page lists this many decisions in full; the rest are summarised by count.
CONFIRMATION_LIST_LIMIT = 200


class ReasonForm(forms.Form):
    reason = forms.CharField(
        label="Reason",
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80, "placeholder": "e.g. provider outage 14:02-14:20 is over (INC-231)"}),
        help_text="Required. Written to the audit trail (Operator actions) and the admin log with every object acted on.",
    )


def confirm_then_run(
    modeladmin,
    request,
    queryset: QuerySet,
    *,
    action_name: str,
    title: str,
    intro: str,
    button: str,
    plan: Callable[..., list[Decision]],
    run: Callable[[str], ActionReport],
    will: dict[str, str] | None = None,
    danger: bool = False,
    background: tuple[str, str, Callable[[], Iterable]] | None = None,
):
    """First POST (from the action menu) or GET (a row's button): show the plan and ask for a
    reason. ``plan()`` decides the whole selection, ``plan(ids)`` only those targets. Second POST
    (``post=yes`` with a reason): run the service, log each object acted on,
    one message. ``will`` maps a decision's kind to what the action will do to such a target
    (the decision's own reason says what the target is now). With ``background`` (the
    ``OperatorAction.Action``, the target type and a function giving the targets), more than
    ``PIPELINE_OPS_BULK_THRESHOLD`` targets are not worked through, nor planned again, in the
    request: they go to ``services.bulk``, whose slices decide each target under its locks, and
    the operator is taken to the background action's page (progress, summary, audit rows)."""
    will = will or {}
    # Past the threshold the selection goes to the background, unplanned but for a first look.
    background_ids = None
    if background is not None:
        target_ids = _pks(background[2]())
        background_ids = target_ids if bulk.bulk_wanted(len(target_ids)) else None
    form = ReasonForm(request.POST if request.POST.get("post") == "yes" else None)
    if request.POST.get("post") == "yes" and form.is_valid():
        reason = form.cleaned_data["reason"]
        if background_ids is not None:
            action, target_type, _ = background
            started = bulk.bulk_start(action=action, target_type=target_type, target_ids=background_ids,
                                      actor=request.user, reason=reason, source="admin")
            url = reverse("admin:pipeline_ops_bulkaction_change", args=[started.pk])
            modeladmin.message_user(request, format_html(
                '{}: {} {}s are being worked through in the background: <a href="{}">follow its progress</a>.',
                title, len(background_ids), target_type.replace("_", " "), url,
            ), messages.SUCCESS)
            return HttpResponseRedirect(url)
        if not any(d.acts for d in plan()):
            # Nothing to do (the button was disabled; a crafted or stale POST): write nothing,
            # not even skipped audit rows, and say so.
            modeladmin.message_user(request, f"{title}: nothing to do, every selected item is skipped; nothing was written.", messages.WARNING)
            return None
        report = run(reason)
        for decision in report.decisions:
            if decision.acts:
                modeladmin.log_change(request, decision.target, f"{title}: {decision.reason}. Reason: {reason}")
        modeladmin.message_user(request, report.message, messages.SUCCESS if report.done else messages.WARNING)
        return None  # back to the change list, like delete_selected

    # Too many to decide in a page (seconds at 10,000): what would happen to the first few now;
    # the background action decides each target when its turn comes.
    decisions = plan() if background_ids is None else plan(background_ids[:CONFIRMATION_LIST_LIMIT])
    acting = [d for d in decisions if d.acts]
    skipping = [d for d in decisions if not d.acts]
    select_across = request.POST.get("select_across") == "1"
    context = {
        **modeladmin.admin_site.each_context(request),
        "title": title,
        "intro": intro,
        "button": button,
        "danger": danger,
        "opts": modeladmin.model._meta,
        "action_name": action_name,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        "select_across": select_across,
        # With "select all N", Django re-applies the change list's filters; one id keeps its
        # "items must be selected" check happy. Otherwise the ids travel as in delete_selected.
        "selected_ids": ([str(queryset.values_list("pk", flat=True).first())] if select_across
                          else [str(pk) for pk in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)]),
        "acting": [(d, will.get(d.kind, d.reason)) for d in acting[:CONFIRMATION_LIST_LIMIT]],
        "skipping": skipping[:CONFIRMATION_LIST_LIMIT],
        "acting_count": len(acting),
        "skipping_count": len(skipping),
        "list_limit": CONFIRMATION_LIST_LIMIT,
        "background_total": None if background_ids is None else len(background_ids),
        "form": form,
        "media": modeladmin.media,
    }
    request.current_app = modeladmin.admin_site.name
    return TemplateResponse(request, "admin/pipeline_ops/action_confirmation.html", context)
