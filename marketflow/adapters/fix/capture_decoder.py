"""The FIX side of the capture use case: validate, parse and enrich one framed message.

The framer (codec.FixFramer) has already checked BeginString, BodyLength and CheckSum; this adds
the field syntax, the required header tags (8, 9, 35, 49, 56, 34, 52) and an integer MsgSeqNum,
and builds the enriched JSON rows ``[tag, name, value, meaning]``.

Two paths, same output (tests hold them equal). The fast path covers the usual message (ASCII,
no NUL, no backslash, exactly one ``=`` per field, no empty value): it splits the whole message
with two C calls and looks up everything that depends only on the sequence of tags (validity,
header positions, names, enumerations) in a per-"shape" cache, since a venue sends the same
few shapes over and over. Everything else takes the reference path: codec.parse_fields,
codec.missing_header_tags and dictionary lookups per field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import orjson

from marketflow.adapters.fix.codec import (
    REQUIRED_HEADER_TAGS,
    FixParseError,
    missing_header_tags,
    parse_fields,
)
from marketflow.adapters.fix.dictionary import TAG_ENUMS, TAG_NAMES
from marketflow.domain.capture import CapturedMessage, InvalidMessage, clean_text

_MSG_TYPES = TAG_ENUMS[35]
_NO_ENUM: dict[str, str] = {}
_MAX_SHAPES = 4096  # a peer sending random tag sets must not grow memory without bound
# A field without "=": with as many "=" as SOH there is then one with two, and the split below
# would pair tags with the wrong values.
_FIELD_WITHOUT_EQ = re.compile("\x01[^=\x01]*\x01")


class _Shape:
    """What follows from a message's tag sequence alone."""

    __slots__ = ("enums", "names", "p8", "p34", "p35", "p49", "p55", "p56", "tags")

    def __init__(self, tags: tuple[int, ...]) -> None:
        self.tags = tags
        self.names = tuple(TAG_NAMES.get(t) for t in tags)
        self.enums: tuple[dict[str, str], ...] = tuple(
            dict(TAG_ENUMS.get(t, _NO_ENUM)) for t in tags
        )
        first: dict[int, int] = {}
        for i, tag in enumerate(tags):
            first.setdefault(tag, i)
        self.p8, self.p34, self.p35 = first[8], first[34], first[35]
        self.p49, self.p56 = first[49], first[56]
        self.p55 = first.get(55, -1)


def _shape(key: str) -> _Shape | None:
    """The shape of tags joined by ``=``; None when the fast path cannot decide on it."""
    parts = key.split("=")
    if not all(p.isdigit() and p[0] != "0" for p in parts):
        return None
    tags = tuple(map(int, parts))
    if tags[:2] != (8, 9) or tags[-1] != 10 or any(t not in tags for t in REQUIRED_HEADER_TAGS):
        return None
    return _Shape(tags)


class FixCaptureDecoder:
    """Implements app.capture.MessageDecoder for FIX."""

    __slots__ = ("_shapes",)

    def __init__(self) -> None:
        self._shapes: dict[str, _Shape | None] = {}

    def decode(self, frame: bytes, received_ms: int, peer: str) -> CapturedMessage:
        """The captured message; raises InvalidMessage with the reject reason."""
        if frame.isascii() and b"\x00" not in frame and b"\\" not in frame:
            text = frame.decode("ascii")
            if text.count("=") == text.count("\x01") and not _FIELD_WITHOUT_EQ.search(text):
                items = text.replace("=", "\x01").split("\x01")
                values = items[1::2]
                if "" not in values:
                    key = "=".join(items[0:-1:2])
                    shapes = self._shapes
                    if key in shapes:
                        shape = shapes[key]
                    else:
                        if len(shapes) >= _MAX_SHAPES:
                            shapes.clear()
                        shape = shapes[key] = _shape(key)
                    if shape is not None:
                        return _fast(shape, values, frame, received_ms, peer)
        return _reference(frame, received_ms, peer)

    def type_name(self, msg_type: str) -> str | None:
        """35=D -> "NewOrderSingle"."""
        return _MSG_TYPES.get(msg_type)


def _fast(
    shape: _Shape, values: list[str], frame: bytes, received_ms: int, peer: str
) -> CapturedMessage:
    seq = values[shape.p34]
    if not seq.isdigit():
        raise InvalidMessage(f"bad_seq_num: {seq[:20]!r}")
    msg_type = values[shape.p35]
    meanings = list(map(dict.get, shape.enums, values))
    rows = list(zip(shape.tags, shape.names, values, meanings, strict=True))
    return CapturedMessage(
        received_ms, peer, frame, values[shape.p8], msg_type, _MSG_TYPES.get(msg_type),
        values[shape.p49], values[shape.p56], int(seq),
        values[shape.p55] if shape.p55 >= 0 else None,
        shape.tags, values, orjson.dumps(rows),
    )  # fmt: skip


def _reference(frame: bytes, received_ms: int, peer: str) -> CapturedMessage:
    try:
        raw_fields = parse_fields(frame)
    except FixParseError as exc:
        raise InvalidMessage(f"parse_error: {exc}") from None
    missing = missing_header_tags(raw_fields)
    if missing:
        raise InvalidMessage("missing_header_tags: " + ",".join(map(str, missing)))
    tags = tuple(tag for tag, _ in raw_fields)
    values = [clean_text(v.decode("utf-8", "replace")) for _, v in raw_fields]
    head = dict(zip(tags[::-1], values[::-1], strict=True))  # first occurrence wins
    seq = head[34]
    if not (seq.isascii() and seq.isdigit()):
        raise InvalidMessage(f"bad_seq_num: {seq[:20]!r}")
    rows = [
        (tag, TAG_NAMES.get(tag), value, TAG_ENUMS.get(tag, _NO_ENUM).get(value))
        for tag, value in zip(tags, values, strict=True)
    ]
    return CapturedMessage(
        received_ms, peer, frame, head[8], head[35], _MSG_TYPES.get(head[35]),
        head[49], head[56], int(seq), head.get(55), tags, values, orjson.dumps(rows),
    )  # fmt: skip


def expand_fields(rows: Sequence[Sequence[object]]) -> list[dict[str, object]]:
    """Stored ``[tag, name, value, meaning]`` rows as objects, for the API."""
    out: list[dict[str, object]] = []
    for tag, name, value, meaning in rows:
        item: dict[str, object] = {"tag": tag, "name": name, "value": value}
        if meaning is not None:
            item["meaning"] = meaning
        out.append(item)
    return out
