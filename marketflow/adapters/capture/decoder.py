"""The FIX side of the capture use case: validate and parse one framed message.

The framer (codec.FixFramer) has already checked BeginString, BodyLength and CheckSum; this adds
the field syntax, the required header tags (8, 9, 35, 49, 56, 34, 52) and an integer MsgSeqNum,
and builds the parsed fields as a JSON array of ``["tag", "value"]`` pairs. Names and enum
meanings are not part of what is stored: they follow from the static dictionary, added when
the audit trail is read (app.capture's FieldDictionary port), so the hot path does no
per-field lookups.

Two paths, same output (tests hold them equal). The fast path covers the usual message
("plain": printable ASCII and SOH, no ``"`` or backslash, exactly one ``=`` per field, no empty
value): it splits the whole message with two C calls, checks what depends only on the sequence
of tags (validity, header positions) once per "shape" in a cache, since a venue sends the same
few shapes over and over, and turns the message text into the JSON pairs with two
``str.replace`` calls (nothing in a plain message needs JSON escaping). Everything else takes
the reference path: codec.parse_fields, codec.missing_header_tags and orjson.

``decode_many`` does the same for all the frames of one read: the plain checks run once over
the frames joined, then each message is cut as above (tests hold it equal to ``decode`` frame
by frame).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import accumulate

import orjson

from marketflow.adapters.fix.codec import (
    REQUIRED_HEADER_TAGS,
    FixParseError,
    missing_header_tags,
    parse_fields,
)
from marketflow.domain.capture import CapturedMessage, InvalidMessage, clean_text

_MAX_SHAPES = 4096  # a peer sending random tag sets must not grow memory without bound
# A field without "=": with as many "=" as SOH there is then one with two, and the split below
# would pair tags with the wrong values.
_FIELD_WITHOUT_EQ = re.compile("\x01[^=\x01]*\x01")
# Bytes a plain message has none of: control characters other than SOH, '"' and backslash
# (JSON and COPY text would have to escape them). Checked with one bytes.translate.
_NOT_PLAIN = bytes((*range(0, 1), *range(2, 32), 0x22, 0x5C))
_NOT_SEPARATOR = bytes(b for b in range(256) if b not in b"=\x01")
_PAIR = b"=\x01"


class _Shape:
    """What follows from a message's tag sequence alone."""

    __slots__ = ("p8", "p34", "p35", "p49", "p55", "p56", "tags")

    def __init__(self, tags: tuple[int, ...]) -> None:
        self.tags = tags
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

    def _shape_of(self, key: str) -> _Shape | None:
        """The cached shape of a message with these tags (bounded: cleared when full)."""
        shapes = self._shapes
        if key in shapes:
            return shapes[key]
        if len(shapes) >= _MAX_SHAPES:
            shapes.clear()
        shape = shapes[key] = _shape(key)
        return shape

    def decode(self, frame: bytes, received_ms: int, peer: str) -> CapturedMessage:
        """The captured message; raises InvalidMessage with the reject reason."""
        if frame.isascii() and len(frame.translate(None, _NOT_PLAIN)) == len(frame):
            text = frame.decode("ascii")
            if text.count("=") == text.count("\x01") and not _FIELD_WITHOUT_EQ.search(text):
                items = text.replace("=", "\x01").split("\x01")
                values = items[1::2]
                if "" not in values:
                    shape = self._shape_of("=".join(items[0:-1:2]))
                    if shape is not None:
                        seq = values[shape.p34]
                        if not seq.isdigit():
                            raise InvalidMessage(f"bad_seq_num: {seq[:20]!r}")
                        # 8=FIX.4.2<SOH>9=5<SOH> -> [["8","FIX.4.2"],["9","5"]]: nothing to escape.
                        fields_json = (
                            '[["' + text[:-1].replace("=", '","').replace("\x01", '"],["') + '"]]'
                        )
                        return CapturedMessage(
                            received_ms, peer, frame, values[shape.p8], values[shape.p35],
                            values[shape.p49], values[shape.p56], int(seq),
                            values[shape.p55] if shape.p55 >= 0 else None,
                            shape.tags, values, fields_json, True,
                        )  # fmt: skip
        return _reference(frame, received_ms, peer)

    def decode_many(
        self, frames: Sequence[bytes], received_ms: int, peer: str
    ) -> tuple[list[CapturedMessage], list[tuple[str, bytes]]]:
        """``decode`` of every frame of one read: the messages, and (reason, frame) for each
        invalid one, in order. The plain checks run once over the frames joined (a field
        without ``=`` or with two, an empty value, a byte to escape); each message is then
        split and cut as in ``decode``. A read that fails them goes frame by frame, and so does
        one with a frame that does not start with ``8=`` or end with SOH (the checks over the
        joined text count on every frame's fields being whole, as the framer's are: a frame
        cut short would glue its last field to the next frame's first)."""
        block = b"".join(frames)
        if not (
            all(f.startswith(b"8=") and f.endswith(b"\x01") for f in frames)
            and block.isascii()
            and len(block.translate(None, _NOT_PLAIN)) == len(block)
        ):
            return self._one_by_one(frames, received_ms, peer)
        # "=" and SOH alternate, starting with "=": exactly one "=" in every field. And no
        # empty value.
        separators = block.translate(None, _NOT_SEPARATOR)
        if separators != _PAIR * (len(separators) >> 1) or b"=\x01" in block:
            return self._one_by_one(frames, received_ms, peer)
        text = block.decode("ascii")
        # The fields JSON of all the messages at once: each field's "=" and SOH grow by 2 and
        # 4 characters, so a message's part starts 6 characters further per field before it.
        as_json = text.replace("=", '","').replace("\x01", '"],["')
        out: list[CapturedMessage] = []
        bad: list[tuple[str, bytes]] = []
        start = at = 0
        for frame, end in zip(frames, accumulate(map(len, frames)), strict=True):
            msg = text[start:end]
            start = end
            items = msg.replace("=", "\x01").split("\x01")
            json_at = at
            at += len(msg) + 3 * len(items) - 3  # 6 per field, 2 items per field, plus one
            shape = self._shape_of("=".join(items[0:-1:2]))
            if shape is None:
                try:
                    out.append(_reference(frame, received_ms, peer))
                except InvalidMessage as exc:
                    bad.append((exc.reason, frame))
                continue
            values = items[1::2]
            seq = values[shape.p34]
            if not seq.isdigit():
                bad.append((f"bad_seq_num: {seq[:20]!r}", frame))
                continue
            out.append(
                CapturedMessage(
                    received_ms, peer, frame, values[shape.p8], values[shape.p35],
                    values[shape.p49], values[shape.p56], int(seq),
                    values[shape.p55] if shape.p55 >= 0 else None, shape.tags, values,
                    '[["' + as_json[json_at : at - 5] + '"]]', True,
                )
            )  # fmt: skip
        return out, bad

    def _one_by_one(
        self, frames: Sequence[bytes], received_ms: int, peer: str
    ) -> tuple[list[CapturedMessage], list[tuple[str, bytes]]]:
        out: list[CapturedMessage] = []
        bad: list[tuple[str, bytes]] = []
        for frame in frames:
            try:
                out.append(self.decode(frame, received_ms, peer))
            except InvalidMessage as exc:
                bad.append((exc.reason, frame))
        return out, bad


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
    fields_json = orjson.dumps([[str(t), v] for t, v in zip(tags, values, strict=True)]).decode()
    return CapturedMessage(
        received_ms, peer, frame, head[8], head[35], head[49], head[56], int(seq), head.get(55),
        tags, values, fields_json,
    )  # fmt: skip
