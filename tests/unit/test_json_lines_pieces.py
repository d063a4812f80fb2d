"""A grown read (beyond ``PIECE_BYTES``) is decoded a piece of whole lines at a time and
folded into one batch: the same batch as one decode of the whole chunk, a bad line anywhere
still costs only itself, and nothing is counted twice when a late piece sends the chunk to
the per-line path."""

from __future__ import annotations

import random

import msgspec
import orjson
import pytest

from marketflow.adapters.feeds import json_lines
from marketflow.adapters.feeds.json_lines import PIECE_BYTES, JsonLinesParser
from marketflow.domain.ticks import BookUpdate, RejectCounts, TickBatch

NOW = 1_795_694_355_187
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def parser() -> JsonLinesParser:
    return JsonLinesParser("ex", frozenset(SYMBOLS), RejectCounts(), 60_000)


def lines(n: int, seed: int = 1, quotes: bool = False) -> list[bytes]:
    """``n`` reference lines over three symbols and ~40 seconds, prices random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        price = rng.uniform(1, 1000)
        quote = b',"bid":%r,"ask":%r' % (price - 0.5, price + 0.5) if quotes else b""
        out.append(b'{"symbol":"%s","price":%r,"timestamp":%d%s}\n' % (
            SYMBOLS[rng.randrange(3)].encode(), price, NOW - 40_000 + i * 7, quote))  # fmt: skip
    return out


class Counting:
    """The typed decoder, noting the size of each array it decodes."""

    def __init__(self, decoder: msgspec.json.Decoder[list[object]]) -> None:
        self.decoder = decoder
        self.sizes: list[int] = []

    def decode(self, data: bytes) -> list[object]:
        self.sizes.append(len(data))
        return self.decoder.decode(data)


def whole(chunk: bytes, monkeypatch: pytest.MonkeyPatch) -> TickBatch:
    """The chunk decoded at once (pieces as big as the chunk)."""
    with monkeypatch.context() as m:
        m.setattr(json_lines, "PIECE_BYTES", len(chunk))
        return parser().parse(chunk, NOW)


def test_a_grown_read_is_decoded_in_pieces_into_the_batch_of_one_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunk = b"".join(lines(12_000))
    assert len(chunk) > 4 * PIECE_BYTES
    p = parser()
    counting = Counting(p._typed)
    monkeypatch.setattr(p, "_typed", counting)
    batch = p.parse(chunk, NOW)
    assert len(counting.sizes) >= 4  # in pieces of whole lines, none over twice a piece
    assert max(counting.sizes) < 2 * PIECE_BYTES * 1.1
    assert sum(counting.sizes) > len(chunk)
    want = whole(chunk, monkeypatch)
    assert batch.count == want.count == 12_000
    assert batch.folded == want.folded  # low, high, sum, count and the newest tick per second
    assert batch.by_symbol == {}


@pytest.mark.parametrize("where", [0.1, 0.5, 0.99])
def test_a_bad_line_in_any_piece_costs_only_itself_and_rejects_count_once(
    where: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = lines(12_000)
    unknown = b'{"symbol":"XRPUSDT","price":1.5,"timestamp":%d}\n' % NOW
    bad = b'{"symbol":"BTCUSDT","price":true,"timestamp":%d}\n' % NOW
    at = int(where * len(good))
    chunk = b"".join([unknown, *good[:at], bad, *good[at:]])  # unknown: in the first piece
    p = parser()
    batch = p.parse(chunk, NOW)
    assert p.rejects.counts == {"unknown_symbol": 1, "price_not_number": 1}
    assert batch.count == 12_000
    assert batch.seconds() == whole(b"".join(good), monkeypatch).seconds()


def test_quotes_across_pieces_give_the_last_quote_per_symbol() -> None:
    chunk_lines = lines(9_000, quotes=True)
    chunk = b"".join(chunk_lines)
    assert len(chunk) > 4 * PIECE_BYTES
    batch = parser().parse(chunk, NOW)
    last: dict[str, BookUpdate] = {}
    for raw in chunk_lines:
        o = orjson.loads(raw)
        last[o["symbol"]] = BookUpdate("ex", o["symbol"], o["bid"], o["ask"], o["timestamp"])
    assert batch.books == list(last.values())
    assert batch.count == 9_000
