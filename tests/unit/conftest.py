"""Unit-test ordering: the slow model-based test runs last.

A fail-fast run (``-x``, as ``make mutation`` runs mutmut) then stops at the first fast test
that fails instead of first spending ~12 s on hypothesis examples; the set of tests run and
their verdicts do not change.
"""

from __future__ import annotations

import pytest

_SLOW_LAST = ("tests/unit/test_exactness_model.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.nodeid.split("::", 1)[0].endswith(_SLOW_LAST))
