"""Parse cost of one 35=X message with 3 entries: lean path vs a plain split vs simplefix.

``python -m bench.fix_parse``: microseconds per message, all measured in this one run (the
machine is shared: compare the ratio, not the absolute figures across runs):

- ``split_us``: ``frame.split(SOH)`` and each field split on ``=`` into tag and value, the
  least any parser does (the baseline of the issue's ratio); ``split_only_us``: the split alone;
- ``lean_us``: the whole lean path from 64 KiB reads to a TickBatch: FixFramer (BeginString,
  BodyLength, CheckSum validated) + FixMarketDataParser; ``lean_parser_us`` /
  ``framer_us``: its two halves;
- ``simplefix_us``: simplefix's FixParser, one message per append_buffer + get_message.

The last line is one JSON object.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import simplefix

from marketflow.adapters.feeds.fix_market_data import FixMarketDataParser
from marketflow.adapters.fix.codec import SOH, FieldValue, FixFramer, encode
from marketflow.domain.ticks import RejectCounts

N = 2_000  # messages per timed run: short runs, many of them, the best kept (shared machine)
RECEIVED_MS = 1_735_819_200_200  # 100 ms after the message was sent: every entry is taken
READ = 65536  # the feed reader's chunk size
ROUNDS = 60  # each figure is the best of this many runs, taken in turns


def message() -> bytes:
    """The bench's 35=X: a bid, an offer and a trade of one symbol, as a venue sends them."""
    fields: list[tuple[int, FieldValue]] = [(268, 3)]
    for kind, px in (("0", "99999.5"), ("1", "100000.5"), ("2", "100000.1")):
        fields += [(279, 0 if kind == "2" else 1), (269, kind), (55, "BTCUSDT"), (270, px)]
        fields += [(271, "0.5"), (273, "12:00:00.100")]
    return encode("X", fields, sender="VENUE", target="MARKETFLOW", seq=123456,
                  sending_time="20250102-12:00:00.100")  # fmt: skip


def _split_only(frames: list[bytes]) -> None:
    for frame in frames:
        frame.split(SOH)


def _split(frames: list[bytes]) -> None:
    for frame in frames:
        for part in frame.split(SOH):
            part.partition(b"=")


def runners(msg: bytes) -> dict[str, Callable[[], object]]:
    """One callable per figure, each handling N copies of ``msg``."""
    stream = msg * N
    reads = [stream[i : i + READ] for i in range(0, len(stream), READ)]
    frames = [msg] * N

    def framer() -> list[bytes]:
        f = FixFramer()
        out: list[bytes] = []
        for data in reads:
            out += [x for x in f.feed(data) if type(x) is bytes]
        return out

    def lean() -> int:
        f = FixFramer()
        p = FixMarketDataParser("bench", ["BTCUSDT"], RejectCounts())
        ticks = 0
        for data in reads:
            ticks += p.parse([x for x in f.feed(data) if type(x) is bytes], RECEIVED_MS).count
        return ticks if not p.rejects.counts else -1

    def lean_parser() -> int:
        p = FixMarketDataParser("bench", ["BTCUSDT"], RejectCounts())
        ticks = p.parse(frames, RECEIVED_MS).count
        return ticks if not p.rejects.counts else -1

    def with_simplefix() -> None:
        # One message per append: simplefix re-slices its whole buffer per message.
        parser = simplefix.FixParser()
        for frame in frames:
            parser.append_buffer(frame)
            parser.get_message()

    # Every message framed and validated, and its trade taken, none rejected.
    assert len(framer()) == lean() == lean_parser() == N
    return {
        "split_only_us": lambda: _split_only(frames),
        "split_us": lambda: _split(frames),
        "lean_us": lean,
        "lean_parser_us": lean_parser,
        "framer_us": framer,
        "simplefix_us": with_simplefix,
    }


def main() -> None:
    msg = message()
    best = dict.fromkeys(runners(msg), float("inf"))
    runs = runners(msg)
    for _ in range(ROUNDS):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    us = {name: round(seconds / N * 1e6, 2) for name, seconds in best.items()}
    ratio = round(best["lean_us"] / best["split_us"], 2)
    for name, value in us.items():
        print(f"{name:<16} {value:8.2f} us/msg")
    print(f"lean / split     {ratio:8.2f}   (target <= 2)")
    result = {"message_bytes": len(msg), "entries": 3, **us, "lean_over_split": ratio}
    result["lean_over_split_only"] = round(best["lean_us"] / best["split_only_us"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
