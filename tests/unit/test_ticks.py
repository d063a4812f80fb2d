"""price_reject_reason: the one price rule every feed's validator calls."""

from __future__ import annotations

import math

import pytest

from marketflow.domain.ticks import MAX_PRICE, price_reject_reason


@pytest.mark.parametrize(
    ("price", "reason"),
    [
        (1.5, None),
        (7, None),
        (MAX_PRICE, None),
        (math.nextafter(MAX_PRICE, math.inf), "price_out_of_range"),
        (int(MAX_PRICE) + 1, "price_out_of_range"),
        (10**400, "price_out_of_range"),  # compared exactly: float() of it would overflow
        (1e308, "price_out_of_range"),
        (math.inf, "price_not_finite"),
        (-math.inf, "price_not_finite"),
        (math.nan, "price_not_finite"),
        (0.0, "price_not_positive"),
        (-0.0, "price_not_positive"),
        (0, "price_not_positive"),
        (-3, "price_not_positive"),
        (True, "price_not_number"),
        ("1.5", "price_not_number"),
        (None, "price_missing"),
    ],
)
def test_price_rule_with_the_default_maximum(price: object, reason: str | None) -> None:
    assert price_reject_reason(price) == reason


def test_maximum_is_a_parameter() -> None:
    assert price_reject_reason(100.0, 100.0) is None
    assert price_reject_reason(100.5, 100.0) == "price_out_of_range"
    assert price_reject_reason(101, max_price=100.0) == "price_out_of_range"
