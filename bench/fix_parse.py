"""Parse cost of one 35=X message with 3 entries: lean codec vs simplefix.

``python -m bench.fix_parse``; the last line is JSON: microseconds per message for framing +
field split (lean), the full market-data parser (lean, to a TickBatch) and simplefix.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import simplefix

from marketflow.adapters.feeds.fix_market_data import FixMarketDataParser
from marketflow.adapters.fix.codec import FieldValue, FixFramer, encode, parse_fields
from marketflow.domain.ticks import RejectCounts

N = 20_000


def _message() -> bytes:
    fields: list[tuple[int, FieldValue]] = [(268, 3)]
    for kind, px in (("0", "99999.5"), ("1", "100000.5"), ("2", "100000.1")):
        fields += [(279, 0 if kind == "2" else 1), (269, kind), (55, "BTCUSDT"), (270, px)]
        fields += [(271, "0.5"), (273, "12:00:00.100")]
    return encode("X", fields, sender="VENUE", target="MARKETFLOW", seq=123456,
                  sending_time="20250102-12:00:00.100")  # fmt: skip


def _per_msg_us(run: Callable[[], object], messages: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / messages * 1e6


def main() -> None:
    msg = _message()
    chunk = msg * N
    frames = [msg] * N

    def lean_split() -> None:
        for frame in FixFramer().feed(chunk):
            assert isinstance(frame, bytes)
            parse_fields(frame)

    def lean_parser() -> None:
        FixMarketDataParser("bench", ["BTCUSDT"], RejectCounts()).parse(frames, 0)

    def with_simplefix() -> None:
        # One message per append: simplefix re-slices its whole buffer per message.
        parser = simplefix.FixParser()
        for frame in frames:
            parser.append_buffer(frame)
            parser.get_message()

    result = {
        "message_bytes": len(msg),
        "entries": 3,
        "lean_frame_and_split_us": round(_per_msg_us(lean_split, N), 2),
        "lean_market_data_parser_us": round(_per_msg_us(lean_parser, N), 2),
        "framer_only_us": round(_per_msg_us(lambda: FixFramer().feed(chunk), N), 2),
        "simplefix_us": round(_per_msg_us(with_simplefix, N), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
