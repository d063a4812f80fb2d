"""CPU of the FIX framer: a packet stream in 16 KiB reads, and one message trickled byte by byte.

    python -m bench.framer

The trickle figures must grow linearly with the message size (the cost per byte stays flat):
a framer that re-scans its buffer on every read grows quadratically. JSON on the last line.
"""

from __future__ import annotations

import json
import time

from marketflow.adapters.fix.codec import FieldValue, FixFramer, encode


def packet_us_per_msg(n: int = 20_000, read: int = 16_384) -> float:
    fields: list[tuple[int, FieldValue]] = [(268, 1), (279, 0), (269, 2), (55, "BTCUSDT")]
    data = b"".join(
        encode("X", [*fields, (270, "100.5"), (271, 2)], sender="V", target="MF", seq=i,
               sending_time="20250102-12:00:00.000")
        for i in range(1, n + 1)
    )  # fmt: skip
    chunks = [data[i : i + read] for i in range(0, len(data), read)]
    best = float("inf")
    for _ in range(5):
        framer = FixFramer()
        t0 = time.process_time()
        count = sum(len(framer.feed(c)) for c in chunks)
        best = min(best, time.process_time() - t0)
        assert count == n
    return best / n * 1e6


def trickle_us_per_byte(size: int) -> float:
    fields: list[tuple[int, FieldValue]] = [(58, "x")] * (size // 5)
    msg = encode("D", fields, sender="A", target="B", seq=1, sending_time="20250102-12:00:00")
    framer = FixFramer()
    t0 = time.process_time()
    out = [f for i in range(len(msg)) for f in framer.feed(msg[i : i + 1])]
    elapsed = time.process_time() - t0
    assert out == [msg]
    return elapsed / len(msg) * 1e6


def main() -> None:
    packet = packet_us_per_msg()
    trickle = {size: trickle_us_per_byte(size) for size in (4_000, 16_000, 64_000)}
    print(f"packet: {packet:.3f} us/msg")
    for size, us in trickle.items():
        print(f"trickled {size:>6} B message: {us:.3f} us/byte")
    print(
        json.dumps(
            {
                "packet_us_per_msg": round(packet, 3),
                "trickle_us_per_byte": {str(k): round(v, 3) for k, v in trickle.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
