"""The back-off policy, from a table: delays the engine asks for, and the retry budget."""

from __future__ import annotations

import random

import pytest

from tmpfsboot.boot.errors import FetchError, TransientFetchError
from tmpfsboot.boot.fetch import RetryBudget, parse_retry_after

pytestmark = pytest.mark.unit

DELAYS = [
    # (backoff, failures in a row, Retry-After, lowest, highest)
    (10.0, 0, None, 10.0, 40.0),  # the seed's random 10-39 s
    (10.0, 1, None, 20.0, 80.0),
    (10.0, 3, None, 80.0, 300.0),  # capped at 30 x backoff
    (10.0, 12, None, 300.0, 300.0),
    (0.01, 0, None, 0.01, 0.04),
    (10.0, 0, 2.0, 2.0, 3.0),  # Retry-After sets the delay, stretched by up to half
    (10.0, 5, 120.0, 120.0, 180.0),
    (10.0, 0, 0.0, 1.0, 1.5),  # Retry-After: 0 is floored, no tight loop
    (0.01, 0, 0.0, 0.01, 0.015),
]


@pytest.mark.parametrize(("backoff", "streak", "retry_after", "low", "high"), DELAYS)
def test_delay_within_policy(backoff: float, streak: int, retry_after: float | None,
                             low: float, high: float) -> None:
    for seed in range(50):
        budget = RetryBudget(None, backoff, rng=random.Random(seed), streak=streak)
        assert low <= budget.delay(retry_after) <= high


def test_budget_waits_then_gives_up_naming_the_error() -> None:
    waited: list[float] = []
    budget = RetryBudget(2, 0.01, wait=waited.append)
    error = TransientFetchError("http://h/x.tar: HTTP 503 Service Unavailable")
    budget.fail(error)
    budget.fail(error)
    with pytest.raises(FetchError, match=r"HTTP 503.*gave up after 2 retries"):
        budget.fail(error)
    assert len(waited) == 2 and waited[1] >= 0.02  # doubled for the second failure in a row


def test_progress_restarts_the_backoff() -> None:
    budget = RetryBudget(None, 1.0, wait=lambda _: None)
    budget.fail(TransientFetchError("x"))
    budget.fail(TransientFetchError("x"))
    budget.progressed()
    assert 1.0 <= budget.delay() <= 4.0


@pytest.mark.parametrize(("value", "expected"), [
    ("5", 5.0), ("0", 0.0), (None, None), ("soon", None),
    ("Wed, 25 Nov 2026 10:00:30 GMT", 30.0), ("Wed, 25 Nov 2026 09:59:00 GMT", 0.0)])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = 1795600800.0  # Wed, 25 Nov 2026 10:00:00 GMT
    assert parse_retry_after(value, now=now) == expected
