"""The built-in steps and the error classification, without a database."""
from __future__ import annotations

import httpx
import pytest

from pipeline_ops.steps import (
    OutcomeUnknownError, PermanentStepError, StepContext, TransientStepError, UnknownStepError,
    is_outcome_unknown, is_transient, step_get,
)
from pipeline_ops.steps.text import clean_text, language_guess, preprocess, sentiment, summarise, summarise_text


def ctx(payload, outputs=None, step="preprocess"):
    return StepContext(step=step, step_run_id=1, input_id="i", idempotency_key="i:" + step, attempt_number=1,
                       payload=payload, outputs=outputs or {})


def test_preprocess_normalises_text_when_it_has_compat_chars_controls_and_spaces(settings):
    settings.PREPROCESS_MAX_CHARS = 1000
    out = preprocess(ctx({"text": "  The ﬁle\x00 was\u200b   fine\n\n\tand the team is here.  "}))
    assert out["text"] == "The file was fine and the team is here."
    assert out["truncated"] is False and out["language"] == "en" and out["words"] == 9


def test_preprocess_cuts_text_when_longer_than_limit():
    text, truncated = clean_text("word " * 100, max_chars=20)
    assert truncated and len(text) <= 20


def test_preprocess_fails_permanently_when_payload_has_no_text():
    with pytest.raises(PermanentStepError):
        preprocess(ctx({"body": "x"}))
    with pytest.raises(PermanentStepError):
        preprocess(ctx({"text": "\x00\x01  "}))


@pytest.mark.parametrize(("text", "language"), [
    ("Le chat est sur la table et il ne dort pas.", "fr"),
    ("Der Hund ist nicht mit dem Ball auf der Wiese.", "de"),
    ("El perro de la casa es muy grande y no come.", "es"),
    ("ok", "und"),
])
def test_language_guess_names_language_when_function_words_tell(text, language):
    assert language_guess(text) == language


def test_sentiment_labels_text_when_tone_is_clear():
    assert sentiment(ctx({"text": "I love this, it is wonderful!"}, step="sentiment"))["label"] == "positive"
    assert sentiment(ctx({"text": "This is terrible and I hate it."}, step="sentiment"))["label"] == "negative"


def test_sentiment_reads_cleaned_text_when_preprocess_ran():
    scores = sentiment(ctx({"text": "ignored"}, outputs={"preprocess": {"text": "Awful, horrible service."}}, step="sentiment"))
    assert scores["compound"] < 0


def test_summarise_keeps_top_sentences_in_order_when_text_is_long(settings):
    settings.SUMMARY_SENTENCES = 2
    text = "Cats purr. Cats purr and cats sleep all day. Dogs bark. Cats sleep in the sun with other cats."
    picked = summarise_text(text, sentences=2)
    assert picked == ["Cats purr and cats sleep all day.", "Cats sleep in the sun with other cats."]
    assert summarise(ctx({"text": text}, step="summarise"))["sentences"] == 2


@pytest.mark.parametrize(("error", "transient", "unknown"), [
    (httpx.ReadTimeout("slow"), True, True),
    (httpx.ConnectTimeout("no route"), True, False),
    (httpx.ConnectError("refused"), True, False),
    (TransientStepError("429", retry_after_seconds=3), True, False),
    (OutcomeUnknownError("timed out"), True, True),
    (PermanentStepError("400"), False, False),
    (ValueError("bug"), False, False),
])
def test_errors_are_classified_when_step_fails(error, transient, unknown):
    assert is_transient(error) is transient
    assert is_outcome_unknown(error) is unknown


def test_step_policy_comes_from_settings_when_overridden(settings):
    settings.PIPELINE_STEP_POLICIES = {"llm": {"max_attempts": 9, "lease_seconds": 99}}
    step = step_get(name="llm")
    assert step.policy.max_attempts == 9 and step.lease_seconds == 99.0
    assert step.policy.retry_delay(attempt_number=1, error=httpx.ReadTimeout("x")) is not None
    assert step.policy.retry_delay(attempt_number=1, error=PermanentStepError("x")) is None


def test_retry_waits_at_least_retry_after_when_provider_says_so():
    step = step_get(name="llm")
    assert step.policy.retry_delay(attempt_number=1, error=TransientStepError("429", retry_after_seconds=500)) >= 500


def test_unknown_step_raises_when_not_registered(settings):
    with pytest.raises(UnknownStepError):
        step_get(name="nope")
    settings.PIPELINE_STEP_POLICIES = {"llm": {"retries": 3}}
    with pytest.raises(UnknownStepError, match="unknown keys"):
        step_get(name="llm")


def test_llm_timeout_comes_from_step_policy_when_overridden(settings):
    settings.PIPELINE_STEP_POLICIES = {"llm": {"timeout_seconds": 2.5}}
    assert step_get(name="llm").timeout_seconds == 2.5
    settings.PIPELINE_STEP_POLICIES = {}
    assert step_get(name="llm").timeout_seconds is None  # LLM_TIMEOUT_SECONDS, read per call
