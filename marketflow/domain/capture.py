r"""The FIX capture audit trail: captured messages, rejects, queries and the store port.

Raw bytes are stored as text, losslessly and byte-exact for the usual message: SOH stays
``\x01`` (PostgreSQL text holds it; the API shows it as ``|``). Only what text cannot carry, or
what would be ambiguous, is escaped with a backslash: ``\\`` for a backslash, ``\x00`` for NUL
(PostgreSQL text refuses NUL) and ``\xNN`` for every byte that is not part of valid UTF-8.
``raw_from_text`` inverts ``raw_to_text`` exactly, for any bytes.

Parsed fields are stored as one JSON array of ``["tag", "value"]`` string pairs in wire order
(repeating groups and duplicate tags kept): exactly what was received, queryable in SQL
(``fields @> '[["55", "AAPL"]]'``), and cheap both to build on the hot path and for the
database to turn into jsonb. Names and enum meanings are not stored: they follow from the
static FIX dictionary, so the API adds them when it reads (read-time enrichment).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NotRequired, Protocol, TypedDict

_ESCAPE = re.compile(rb"\\(\\|x[0-9a-f]{2})")


def raw_to_text(raw: bytes) -> str:
    """Lossless text form of raw FIX bytes (see the module docstring)."""
    if b"\\" not in raw and b"\x00" not in raw:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    escaped = raw.replace(b"\\", b"\\\\").replace(b"\x00", b"\\x00")
    return escaped.decode("utf-8", "backslashreplace")


def _unescape(match: re.Match[bytes]) -> bytes:
    code = match.group(1)
    return b"\\" if code == b"\\" else bytes((int(code[1:], 16),))


def raw_from_text(text: str) -> bytes:
    """The original bytes of a ``raw_to_text`` string."""
    data = text.encode("utf-8")
    return _ESCAPE.sub(_unescape, data) if b"\\" in data else data


def raw_display(text: str) -> str:
    """A stored raw text for reading: SOH shown as ``|``."""
    return text.replace("\x01", "|")


def clean_text(value: str) -> str:
    """``value`` without NUL characters (escaped as ``\\x00``): PostgreSQL text refuses them."""
    return value.replace("\x00", "\\x00") if "\x00" in value else value


@dataclass(slots=True)
class CapturedMessage:
    """A valid FIX message as received, with the header columns the audit trail indexes."""

    received_ms: int
    peer: str
    raw: bytes
    begin_string: str
    msg_type: str
    sender: str
    target: str
    seq_num: int
    symbol: str | None
    tags: Sequence[int]  # parsed fields, in wire order: what the capture filters look at
    values: Sequence[str]
    fields_json: str  # the parsed fields as a JSON array of ["tag", "value"] pairs
    # True when raw is printable ASCII plus SOH without '"' or backslash: then raw, every value
    # and fields_json need no escaping in any text form (a store may skip its escaping step).
    plain: bool = False


@dataclass(slots=True)
class CaptureReject:
    """Bytes that were not a valid FIX message, kept with the reason."""

    received_ms: int
    peer: str
    reason: str
    raw: bytes


@dataclass(slots=True)
class StoredMessage:
    """A captured message read back from the store."""

    id: int
    received_ms: int
    peer: str
    raw: str  # raw_to_text form
    begin_string: str
    msg_type: str
    sender: str
    target: str
    seq_num: int
    symbol: str | None
    fields: list[tuple[int, str]]  # the parsed (tag, value) pairs, in wire order


def stored_fields(fields: Sequence[Sequence[str]]) -> list[tuple[int, str]]:
    """Stored ``fields`` JSON (decoded ``["tag", "value"]`` pairs) as ``(tag, value)`` pairs."""
    return [(int(tag), value) for tag, value in fields]


class EnrichedField(TypedDict):
    """One field of a message with its dictionary name and, for enumerations, its meaning."""

    tag: int
    name: str | None
    value: str
    meaning: NotRequired[str]


class FieldDictionary(Protocol):
    """Names and enumerated meanings of a protocol's fields (the static FIX dictionary)."""

    def meaning(self, tag: int, value: str) -> str | None:
        """The meaning of ``value`` for an enumerated ``tag``, e.g. (54, "1") -> "Buy"."""
        ...

    def enrich(self, fields: Sequence[tuple[int, str]]) -> list[EnrichedField]:
        """Per field, in wire order: tag, name, value and meaning where one applies."""
        ...


@dataclass(slots=True)
class StoredReject:
    """A reject read back from the store."""

    id: int
    received_ms: int
    peer: str
    reason: str
    raw: str  # raw_to_text form


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """Newest first; ``before_id`` pages (keyset), ``offset`` skips; filters are ANDed."""

    limit: int = 100
    before_id: int | None = None
    offset: int = 0
    msg_type: str | None = None
    symbol: str | None = None
    since_ms: int | None = None


class CaptureStore(Protocol):
    """Durable audit trail of captured FIX messages and rejects."""

    kind: str  # "postgres" | "sqlite": shown in /health

    async def write(
        self, messages: Sequence[CapturedMessage], rejects: Sequence[CaptureReject]
    ) -> list[CaptureReject]:
        """Store both in one batch. A row the store refuses does not sink the batch: it is
        returned as a reject (with the store's reason) after being written to the rejects table
        when possible. Raises StoreUnavailable when the store cannot be reached (the caller
        retries the whole batch)."""
        ...

    async def list_messages(self, query: MessageQuery) -> list[StoredMessage]: ...

    async def get_message(self, message_id: int) -> StoredMessage | None: ...

    async def list_rejects(self, limit: int, before_id: int | None) -> list[StoredReject]: ...

    async def count(self) -> tuple[int, int]:
        """(messages, rejects) stored."""
        ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...


class InvalidMessage(ValueError):
    """A framed message that fails validation; ``reason`` goes to the rejects table."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
