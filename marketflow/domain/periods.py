"""Query periods: ``1s``, ``3s``, ``5m``, ``2h`` ... parsed into seconds."""

from __future__ import annotations

import re

from marketflow.domain.errors import BadRequest

_PERIOD = re.compile(r"([1-9][0-9]{0,6})(s|m|h)")  # used with fullmatch: "$" allows "1s\n"
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
MAX_PERIOD_S = 366 * 86_400


def parse_period(text: str) -> int:
    """Seconds in ``text``; BadRequest with a readable reason otherwise."""
    m = _PERIOD.fullmatch(text)
    if m is None:
        raise BadRequest(
            f"invalid period {text[:32]!r}: use a positive number followed by s, m or h "
            "(e.g. 1s, 30s, 5m, 2h)"
        )
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds > MAX_PERIOD_S:
        raise BadRequest(f"period {text!r} is longer than the maximum of 366 days")
    return seconds
