"""Lean decoding of one framed 35=W / 35=X message: header values and NoMDEntries as tuples.

No dict per field or per entry, no decode. Three paths, one answer (tests hold each of them to
simplefix, field for field):

- a 35=X laid out as the protocol says (35 third; per entry 279 269 55 270, then 271 and 273
  when sent; the group last; a plain unsigned decimal price): one anchored pattern, compiled
  once per entry count, matches the whole message and its groups are the fields read
  (``incremental_pattern``; the market-data parser runs it inline);
- anything else (``decode``): ``=`` becomes SOH and the message is split once, so the list
  alternates tag and value (two slices); when all entries share one layout, one ``itemgetter``
  cached per layout and entry count picks the fields (a positional walk); entries of
  different layouts are walked one field at a time;
- a value containing ``=``: every field is split on its first ``=``.

Duplicate tags: in the header the first occurrence wins (as simplefix ``get`` does); inside an
entry the last one wins. An entry starts at each occurrence of the group's first tag, and
everything after NoMDEntries (268) belongs to the group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter
from typing import Any

SOH = b"\x01"

# What the parser reads of an entry, in this order (the tuple of every entry):
# MDUpdateAction, MDEntryType, Symbol, MDEntryPx, MDEntryTime, MDEntryDate, TradeID, MDEntryID.
ENTRY_TAGS = (b"279", b"269", b"55", b"270", b"273", b"272", b"1003", b"278")
Entry = tuple[bytes | None, ...]
"""One entry's values of ENTRY_TAGS, None where the tag is absent."""

_LAYOUT_MAX = 256  # distinct entry layouts remembered (a venue sends a handful)
_WIDTH = len(ENTRY_TAGS)
_getters: dict[tuple[object, ...], Callable[[list[bytes | None]], tuple[Any, ...]]] = {}


Decoded = tuple[bytes | None, bytes | None, bytes | None, Iterable[Entry]]
"""MsgType, SendingTime, the message-level Symbol (None when no entry needs it) and the entries."""

_HEAD = (  # possessive (*+): a field never gives back what it matched, nothing to undo
    rb"8=[^\x01]*+\x019=[0-9]*+\x0135=X\x01(?:[^\x01]*+\x01)*?52=([^\x01]*+)\x01"
    rb"(?:[^\x01]*+\x01)*?268=[0-9]*+"
)
_ENTRY = (  # a price here is a plain unsigned decimal: anything else takes the general path
    rb"\x01279=([^\x01]*+\x01269=[^\x01]*+\x0155=[^\x01]++)"
    rb"\x01270=([0-9]+\.?[0-9]*|\.[0-9]+)(?:\x01271=[^\x01]*+)?(?:\x01273=([^\x01]*+))?"
)
ENTRY_START = b"\x01279="
_ENTRIES_MAX = 32  # more entries per message than this: the general path
INCREMENTALS: dict[int, re.Pattern[bytes] | None] = {}
"""The pattern of a standard 35=X per number of entries (counted as ``ENTRY_START``), cached."""


def incremental_pattern(count: int) -> re.Pattern[bytes] | None:
    """The pattern of a standard 35=X of ``count`` entries (None: too many, or none).

    It matches the standard header (35=X third, the first 52 and the first 268 found field by
    field), then ``count`` entries laid out as the protocol says (279 269 55 270, then 271 and
    273 when sent, nothing else), then the CheckSum: anchored, one C call. Its groups:
    SendingTime, then for each entry ``<279><SOH>269=<269><SOH>55=<55>`` as one value (the
    parser looks the three up at once), 270 and 273 (b"" when absent)."""
    if count in INCREMENTALS:
        return INCREMENTALS[count]
    pattern = None
    if 0 < count <= _ENTRIES_MAX:
        pattern = re.compile(_HEAD + _ENTRY * count + rb"\x0110=[0-9]{3}\x01")
    INCREMENTALS[count] = pattern
    return pattern


def decode_incremental(frame: bytes) -> tuple[bytes | Any, ...] | None:
    """The fast path: the groups of ``incremental_pattern`` for ``frame``, else None (another
    message type or layout). An empty 273 reads as an absent one."""
    pattern = INCREMENTALS.get(frame.count(ENTRY_START)) or incremental_pattern(
        frame.count(ENTRY_START)
    )
    found = None if pattern is None else pattern.fullmatch(frame)
    return None if found is None else found.groups(b"")


def decode(frame: bytes) -> Decoded:
    """The parts of any framed message the market-data parser reads: one split."""
    flat = frame.replace(b"=", SOH).split(SOH)
    if len(flat) != 2 * frame.count(SOH) + 1 or flat[-3] != b"10":
        return _decode_general(frame)  # an "=" inside a value, or no CheckSum last
    tags = flat[0::2]
    vals = flat[1::2]
    try:
        g = tags.index(b"268")
    except ValueError:
        g = len(vals) - 1  # no group: the header runs to the CheckSum
    msg_type = vals[2] if tags[2] == b"35" else _first(tags, vals, b"35", g)
    sending = _first(tags, vals, b"52", g)
    symbol = _first(tags, vals, b"55", g)
    end = len(vals) - 1  # CheckSum
    start = g + 1
    if start >= end:
        return msg_type, sending, symbol, ()
    region = tags[start:end]
    count = region.count(region[0])
    stride = len(region) // count
    layout = region[:stride]
    values: list[bytes | None] = [*vals[start:end]]
    if stride * count != len(region) or region != layout * count:
        return msg_type, sending, symbol, _entries(region, vals[start:end])
    values.append(None)  # what the getter reads for a tag the layout lacks
    picked = _getter(layout, count)(values)
    return msg_type, sending, symbol, zip(*[iter(picked)] * _WIDTH, strict=True)


def _first(tags: list[bytes], vals: list[bytes], tag: bytes, stop: int) -> bytes | None:
    try:
        return vals[tags.index(tag, 0, stop)]
    except ValueError:
        return None


def _getter(layout: list[bytes], count: int) -> Callable[[list[bytes | None]], tuple[Any, ...]]:
    """Picks ENTRY_TAGS of ``count`` entries of ``layout`` out of the group's values, in one
    call; a tag the layout lacks reads the None appended after the values."""
    key = (count, *layout)
    getter = _getters.get(key)
    if getter is None:
        last = {tag: i for i, tag in enumerate(layout)}  # the last occurrence wins
        stride = len(layout)
        missing = stride * count
        indices = [
            missing if (off := last.get(tag)) is None else a + off
            for a in range(0, missing, stride)
            for tag in ENTRY_TAGS
        ]
        getter = itemgetter(*indices)
        if len(_getters) >= _LAYOUT_MAX:
            _getters.clear()
        _getters[key] = getter
    return getter


def _entries(tags: Sequence[bytes], vals: Sequence[bytes]) -> list[Entry]:
    """Entries of a group whose entries differ in layout: each starts at the first tag."""
    dicts: list[dict[bytes, bytes]] = []
    delimiter = tags[0]
    for tag, value in zip(tags, vals, strict=True):
        if tag == delimiter:
            dicts.append({})
        dicts[-1][tag] = value
    return [_entry(e) for e in dicts]


def _entry(e: dict[bytes, bytes]) -> Entry:
    return tuple(e.get(tag) for tag in ENTRY_TAGS)


def _decode_general(frame: bytes) -> Decoded:
    """The same answer as ``decode`` by splitting each field on its first ``=``."""
    parts = frame.split(SOH)
    if parts and not parts[-1]:
        parts.pop()
    if parts and parts[-1].startswith(b"10="):
        parts.pop()
    pairs = [part.partition(b"=") for part in parts]
    tags = [tag for tag, _, _ in pairs]
    vals = [value for _, _, value in pairs]
    g = tags.index(b"268") if b"268" in tags else len(tags)
    head = dict(zip(reversed(tags[:g]), reversed(vals[:g]), strict=True))  # first one wins
    entries = _entries(tags[g + 1 :], vals[g + 1 :]) if g + 1 < len(tags) else []
    return head.get(b"35"), head.get(b"52"), head.get(b"55"), entries
