"""Signals the pipeline sends, for observers outside the domain (the chaos run's effects log).

``step_effect_committed`` is sent once by the attempt that completed a step, after its commit:
the moment the attempt *believes it won*. It is sent outside any transaction and never by a
fenced attempt. A receiver that counts these with no unique constraint of its own counts the
effects the guard let through, independently of the database's constraints.

Arguments: ``step_run_id``, ``input_id``, ``step``, ``key`` (the step's idempotency key),
``attempt_number``, ``worker`` (``host:pid``).
"""
from django.dispatch import Signal

step_effect_committed = Signal()
