"""The one reconnect policy (marketflow.backoff): bounds, growth, cap, reset, injected rng."""

from __future__ import annotations

import asyncio
import random

import pytest

from marketflow.backoff import Backoff, reconnect_forever


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(1))

    for failures, base in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (100, 30.0)]:
        delays = [backoff.delay(failures) for _ in range(200)]
        assert all(0.5 * base <= d <= base for d in delays)
        assert len(set(delays)) > 100  # jittered: reconnecting feeds do not move in step


def test_each_failure_doubles_the_bound_until_the_cap() -> None:
    backoff = Backoff(0.1, 1.0, random.Random(2))

    delays = [backoff.fail() for _ in range(8)]

    bounds = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(b / 2 <= d <= b for d, b in zip(delays, bounds, strict=True))
    assert backoff.failures == 8


def test_reset_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(0.1, 10.0, random.Random(3))
    for _ in range(6):
        backoff.fail()

    backoff.reset()

    assert backoff.failures == 0
    assert 0.05 <= backoff.fail() <= 0.1


def test_the_injected_rng_makes_the_delays_repeatable() -> None:
    a, b, c = (Backoff(0.5, 30.0, random.Random(seed)) for seed in (7, 7, 8))

    run_a = [a.fail() for _ in range(10)]

    assert run_a == [b.fail() for _ in range(10)]
    assert run_a != [c.fail() for _ in range(10)]


def test_a_huge_failure_count_stays_at_the_cap() -> None:
    backoff = Backoff(1.0, 4.0, random.Random(4))

    assert 2.0 <= backoff.delay(10**9) <= 4.0


def test_a_fixed_policy_stays_between_half_and_the_whole_delay() -> None:
    backoff = Backoff(2.0, 2.0, random.Random(5))

    assert all(1.0 <= backoff.fail() <= 2.0 for _ in range(100))


@pytest.mark.parametrize(("initial", "cap"), [(-1.0, 1.0), (2.0, 1.0)])
def test_inconsistent_bounds_are_refused(initial: float, cap: float) -> None:
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial, cap, random.Random())


async def test_reconnect_forever_reports_each_end_and_waits_the_backoff() -> None:
    backoff = Backoff(1.0, 8.0, random.Random(6))
    outcomes: list[Exception | None] = [OSError("refused"), None, ValueError("bug"), None]
    ended: list[tuple[str, float]] = []
    waits: list[float] = []

    async def connect() -> None:
        outcome = outcomes.pop(0)
        if outcome is None and not outcomes:
            raise asyncio.CancelledError  # stop the loop after the last outcome
        if outcome is None:
            backoff.reset()  # a connection that made progress
            return
        raise outcome

    async def sleep(delay: float) -> None:
        waits.append(delay)

    with pytest.raises(asyncio.CancelledError):
        await reconnect_forever(
            connect, backoff, lambda exc, delay: ended.append((repr(exc), delay)), sleep=sleep
        )

    assert [e for e, _ in ended] == ["OSError('refused')", "None", "ValueError('bug')"]
    assert [d for _, d in ended] == waits
    assert 0.5 <= waits[0] <= 1.0  # first failure
    assert 0.5 <= waits[1] <= 1.0  # progress reset the backoff
    assert 1.0 <= waits[2] <= 2.0  # second failure in a row
