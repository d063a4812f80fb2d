"""The WHERE clause of an audit-trail listing, for both stores (their SQL differs only in the
placeholder and in how they keep the receipt time)."""

from __future__ import annotations

from collections.abc import Callable

from marketflow.domain.capture import MessageQuery


def listing_filter(
    query: MessageQuery, since: tuple[str, object], placeholder: Callable[[int], str]
) -> tuple[str, list[object]]:
    """`` WHERE ...`` (or nothing) and its arguments. ``since`` is the receipt-time column with
    the store's form of ``query.since_ms`` (None: no bound); ``placeholder(n)`` is the n-th
    parameter (1-based) in the driver's syntax."""
    where: list[str] = []
    args: list[object] = []
    for column, value in (
        ("id <", query.before_id),
        ("msg_type =", query.msg_type),
        ("symbol =", query.symbol),
        (f"{since[0]} >=", since[1]),
    ):
        if value is not None:
            args.append(value)
            where.append(f"{column} {placeholder(len(args))}")
    return (" WHERE " + " AND ".join(where) if where else ""), args
