import pytest

from idempotency import guard
from idempotency.fingerprint import fingerprint
from tests.testapp.models import Receipt


@pytest.mark.django_db(transaction=True)
def test_claim_then_complete_then_replay_when_key_is_new():
    fp = fingerprint({"amount": 5})
    outcome = guard.claim(scope="t", key="k1", operation="charge", fingerprint=fp)
    assert isinstance(outcome, guard.Claimed)
    done = guard.complete(
        attempt=outcome.attempt, result={"ok": 1},
        write=lambda: Receipt.objects.create(key="k1", amount=5, attempt_number=outcome.attempt.number),
    )
    assert not done.fenced
    again = guard.claim(scope="t", key="k1", operation="charge", fingerprint=fp)
    assert isinstance(again, guard.Replay) and again.result == {"ok": 1}
    assert Receipt.objects.count() == 1
