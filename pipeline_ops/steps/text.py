"""Offline text steps: preprocess, sentiment (VADER), summarise (extractive). No network, no weights."""
from __future__ import annotations

import math
import os
import re
import threading
import unicodedata
from collections import Counter

from django.conf import settings

from .base import PermanentStepError, StepContext

# --- preprocess --------------------------------------------------------------------------------

# A few hundred frequent function words per language are plenty to tell these apart on a
# paragraph; short or mixed texts come out "und" (undetermined) rather than as a wrong guess.
_STOPWORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the and of to a in is it that was for on are with as be this have not but they you at by from".split()),
    "fr": frozenset("le la les et de des un une est pas que qui dans pour sur au aux du ce il elle nous vous ne".split()),
    "de": frozenset("der die das und ist nicht ein eine zu den mit von sich auf für im dem des auch es wir ich".split()),
    "es": frozenset("el la los las y de que en un una es por con para no se del al lo como pero su más".split()),
    "it": frozenset("il lo la gli le e di che un una è per non con del della sono si nel anche come".split()),
    "nl": frozenset("de het een en van is niet dat op te in met voor zijn er maar ook als bij wij".split()),
    "pt": frozenset("o a os as e de que em um uma é não para com do da por se mais como mas".split()),
}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_SPACE = re.compile(r"\s+")


def language_guess(text: str) -> str:
    """ISO 639-1 code of the language whose function words occur most, or 'und'."""
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < 3:
        return "und"
    scores = {lang: sum(1 for w in words if w in stop) for lang, stop in _STOPWORDS.items()}
    best, score = max(scores.items(), key=lambda item: item[1])
    ranked = sorted(scores.values(), reverse=True)
    if score == 0 or (len(ranked) > 1 and ranked[1] == score):
        return "und"
    return best


def clean_text(text: str, *, max_chars: int) -> tuple[str, bool]:
    """NFKC, control and format characters dropped, whitespace folded, cut at ``max_chars``."""
    text = unicodedata.normalize("NFKC", text)
    # Whitespace controls (\n, \t…) become spaces before the fold; other C* characters go.
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or not unicodedata.category(ch).startswith("C")
    )
    text = _SPACE.sub(" ", text).strip()
    truncated = len(text) > max_chars
    if truncated:
        text = text[:max_chars].rstrip()
    return text, truncated


def preprocess(ctx: StepContext) -> dict:
    payload = ctx.payload
    if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
        raise PermanentStepError("the payload must be an object with a 'text' string")
    text, truncated = clean_text(payload["text"], max_chars=settings.PREPROCESS_MAX_CHARS)
    if not text:
        raise PermanentStepError("the text is empty after cleaning")
    return {
        "text": text,
        "chars": len(text),
        "words": len(_WORD.findall(text)),
        "truncated": truncated,
        "language": language_guess(text),
    }


# --- sentiment ---------------------------------------------------------------------------------

_analyzer = None
_analyzer_pid: int | None = None
_analyzer_lock = threading.Lock()


def sentiment_analyzer():
    """One VADER analyzer per process, built on first use.

    django-q2 forks its workers from the sentinel: building it lazily (and again if the pid
    changed) means each worker loads the lexicon once, and none inherits a half-built one.
    """
    global _analyzer, _analyzer_pid
    pid = os.getpid()
    if _analyzer is None or _analyzer_pid != pid:
        with _analyzer_lock:
            if _analyzer is None or _analyzer_pid != pid:
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

                _analyzer, _analyzer_pid = SentimentIntensityAnalyzer(), pid
    return _analyzer


def sentiment(ctx: StepContext) -> dict:
    scores = sentiment_analyzer().polarity_scores(ctx.text())
    compound = scores["compound"]
    # VADER's own recommended thresholds.
    label = "positive" if compound >= 0.05 else "negative" if compound <= -0.05 else "neutral"
    return {"label": label, "compound": compound, "pos": scores["pos"], "neu": scores["neu"], "neg": scores["neg"]}


# --- summarise ---------------------------------------------------------------------------------

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_ALL_STOPWORDS = frozenset().union(*_STOPWORDS.values())


def summarise_text(text: str, *, sentences: int) -> list[str]:
    """The ``sentences`` highest-scoring sentences, in their original order.

    A sentence scores the document frequency of its content words, summed and divided by the
    square root of their number (Luhn-style extraction; the root keeps both one-word sentences
    and long rambling ones from winning): deterministic, offline, real work.
    """
    parts = [s.strip() for s in _SENTENCE.split(text) if s.strip()]
    if len(parts) <= sentences:
        return parts
    words_of = [[w.lower() for w in _WORD.findall(p) if w.lower() not in _ALL_STOPWORDS] for p in parts]
    freq = Counter(w for words in words_of for w in words)
    scored = [
        (sum(freq[w] for w in words) / math.sqrt(len(words) or 1), -index)
        for index, words in enumerate(words_of)
    ]
    chosen = sorted(sorted(range(len(parts)), key=lambda i: scored[i], reverse=True)[:sentences])
    return [parts[i] for i in chosen]


def summarise(ctx: StepContext) -> dict:
    text = ctx.text()
    picked = summarise_text(text, sentences=settings.SUMMARY_SENTENCES)
    summary = " ".join(picked)
    return {"summary": summary, "sentences": len(picked), "ratio": round(len(summary) / max(1, len(text)), 3)}
