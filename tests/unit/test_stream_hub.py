"""The stream hub: snapshots first, coalescing per cadence, conflation, caps, bad messages.

``deliver()`` is one cadence, called directly: no timer in these tests.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from marketflow.app.stream_hub import Refused, StreamHub, Subscriber
from marketflow.domain.aggregates import LatestPrice, MinuteRow
from marketflow.settings import StreamSettings
from tests.unit.fakes import ManualClock
from tests.unit.stream_kit import SYMBOLS, FakeSink, FakeView, until

T0 = 1_764_000_000_000


def make_hub(view: FakeView | None = None, **cfg: Any) -> StreamHub:
    return StreamHub(StreamSettings(**cfg), SYMBOLS, ManualClock(T0), view=view)


def join(hub: StreamHub, message: dict[str, Any] | None = None) -> tuple[Subscriber, FakeSink]:
    sink = FakeSink()
    sub = hub.connect(sink)
    if message is not None:
        hub.handle(sub, orjson.dumps(message))
    return sub, sink


async def sent(sub: Subscriber) -> None:
    await until(lambda: not sub.outbox and not sub.sending)


async def test_subscribe_gets_a_snapshot_of_each_channel_before_any_update() -> None:
    view = FakeView(SYMBOLS)
    view.change("BTCUSDT", 50.0)
    hub = make_hub(view)
    hub.publish_latest([LatestPrice("exchange1", "BTCUSDT", 10.0, T0, T0)])

    hub.deliver()  # what changed before anyone subscribed is not sent again
    sub, sink = join(hub, {"op": "subscribe", "channels": ["bbo", "ticks"]})
    await sent(sub)
    view.change("BTCUSDT", 51.0)
    hub.deliver()
    await sent(sub)

    assert sink.kinds() == [("subscribed", ""), ("snapshot", "bbo"), ("snapshot", "ticks"),
                            ("update", "bbo")]  # fmt: skip
    docs = sink.docs()
    assert docs[1]["data"] == {"BTCUSDT": {"symbol": "BTCUSDT", "seq": 1,
                                           "bid": {"price": 50.0}}}  # fmt: skip
    ticks = docs[2]["data"]
    assert isinstance(ticks, dict)
    assert ticks["BTCUSDT"]["prices"] == {"exchange1": {"price": 10.0, "timestamp_ms": T0}}
    assert docs[3]["data"]["BTCUSDT"]["seq"] == 2  # type: ignore[index]
    assert docs[3]["data"]["BTCUSDT"]["bid"] == {"price": 51.0}  # type: ignore[index]


async def test_many_changes_between_cadences_make_one_frame_with_the_latest_values() -> None:
    view = FakeView(SYMBOLS)
    hub = make_hub(view)
    sub, sink = join(hub, {"op": "subscribe", "channels": ["bbo", "ticks"]})
    await sent(sub)
    before = len(sink.frames)

    for i in range(1000):
        for s in SYMBOLS:
            view.change(s, float(i))
        hub.publish_latest([LatestPrice("exchange1", "ETHUSDT", float(i), T0 + i, T0 + i)])
    hub.deliver()
    await sent(sub)

    frames = sink.docs()[before:]
    assert [(f["type"], f["channel"]) for f in frames] == [("update", "ticks"), ("update", "bbo")]
    bbo = frames[1]["data"]
    assert isinstance(bbo, dict)
    assert {s: bbo[s]["seq"] for s in SYMBOLS} == dict.fromkeys(SYMBOLS, 1000)
    assert frames[0]["data"]["ETHUSDT"]["prices"]["exchange1"]["price"] == 999.0  # type: ignore[index]


async def test_nothing_changed_sends_nothing_and_an_unchanged_payload_is_not_resent() -> None:
    view = FakeView(SYMBOLS)
    hub = make_hub(view)
    view.change("BTCUSDT")
    sub, sink = join(hub, {"op": "subscribe", "channels": ["bbo"]})
    await sent(sub)
    hub.deliver()  # the change made before the snapshot: sent (again) once
    await sent(sub)
    count = len(sink.frames)
    assert sink.kinds()[-1] == ("update", "bbo")

    hub.deliver()
    view.listeners[0]("BTCUSDT")  # told of a change, but the BBO is the same
    hub.deliver()
    await sent(sub)

    assert len(sink.frames) == count


async def test_symbol_filter_and_unsubscribe() -> None:
    view = FakeView(SYMBOLS)
    hub = make_hub(view)
    sub, sink = join(hub, {"op": "subscribe", "channels": ["bbo"], "symbols": ["btcusdt"]})
    await sent(sub)

    view.change("ETHUSDT")
    hub.deliver()
    view.change("BTCUSDT")
    hub.deliver()
    await sent(sub)
    hub.handle(sub, b'{"op": "unsubscribe", "channels": ["bbo"]}')
    view.change("BTCUSDT")
    hub.deliver()
    await sent(sub)

    updates = [d for d in sink.docs() if d["type"] == "update"]
    assert [list(d["data"]) for d in updates] == [["BTCUSDT"]]  # type: ignore[call-overload]
    assert sink.docs()[-1]["type"] == "unsubscribed"
    assert hub.stats()["subscribers"]["bbo"] == 0


async def test_a_client_behind_is_conflated_then_gets_the_latest_once_it_catches_up() -> None:
    view = FakeView(SYMBOLS)
    hub = make_hub(view)
    slow, slow_sink = join(hub, {"op": "subscribe", "channels": ["bbo"]})
    fast, fast_sink = join(hub, {"op": "subscribe", "channels": ["bbo"]})
    await sent(slow)
    await sent(fast)
    slow_before, fast_before = len(slow_sink.frames), len(fast_sink.frames)

    slow_sink.held = 100  # its transport holds bytes: it is behind
    for _ in range(5):
        view.change("BTCUSDT")
        hub.deliver()
        await sent(fast)

    assert len(slow_sink.frames) == slow_before  # nothing handed to a client behind
    assert slow.conflated == 4
    assert hub.conflated == 4
    assert len(fast_sink.frames) == fast_before + 5  # the other client got every round

    slow_sink.held = 0
    hub.deliver()
    await sent(slow)

    last = slow_sink.docs()[slow_before:]
    assert len(last) == 1
    assert last[0]["data"]["BTCUSDT"]["seq"] == 5  # type: ignore[index]
    assert slow_sink.closed_with is None


async def test_a_client_too_far_behind_is_closed_with_1008_and_counted() -> None:
    view = FakeView(SYMBOLS, pad=600)
    hub = make_hub(view, max_buffered_bytes=4096)
    slow, slow_sink = join(hub, {"op": "subscribe", "channels": ["bbo"]})
    fast, fast_sink = join(hub, {"op": "subscribe", "channels": ["bbo"]})
    await sent(slow)
    slow_sink.held = 1

    rounds = 0
    while hub.slow_closed == 0:
        rounds += 1
        assert rounds < 50, "never closed"
        for s in SYMBOLS:
            view.change(s)
        hub.deliver()
        await sent(fast)
    await until(lambda: slow_sink.closed_with is not None)

    assert slow_sink.closed_with == (1008, "slow consumer")
    assert slow.conflated > 0  # conflated first, closed once too far behind
    assert hub.stats()["slow_closed"] == 1
    assert hub.stats()["connections"] == 1
    assert fast_sink.closed_with is None
    assert fast_sink.docs()[-1]["data"]["BTCUSDT"]["seq"] == rounds  # type: ignore[index]


async def test_connection_cap_refuses_and_counts() -> None:
    hub = make_hub(max_connections=2)
    join(hub)
    join(hub)

    with pytest.raises(Refused):
        join(hub)

    assert hub.stats()["connections_refused"] == 1
    assert hub.stats()["connections"] == 2


async def test_subscription_cap_answers_an_error_and_the_connection_lives() -> None:
    hub = make_hub(max_subscriptions=3)
    sub, sink = join(hub)

    hub.handle(sub, orjson.dumps({"op": "subscribe", "channels": ["ticks", "aggregates"],
                                  "symbols": ["BTCUSDT", "ETHUSDT"]}))  # fmt: skip
    hub.handle(sub, orjson.dumps({"op": "subscribe", "channels": ["ticks"],
                                  "symbols": ["BTCUSDT", "ETHUSDT", "SOLUSDT"]}))  # fmt: skip
    await sent(sub)

    docs = sink.docs()
    assert docs[0]["type"] == "error"
    assert "too many subscriptions" in str(docs[0]["error"])
    assert docs[1]["type"] == "subscribed"
    assert hub.stats()["subscriptions_refused"] == 1
    assert hub.stats()["subscribers"]["ticks"] == 1


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"op": "sub", "channels": ["bbo"]}', "op must be"),
        (b'{"op": "subscribe", "channels": ["trades"]}', "unknown channel"),
        (b'{"op": "subscribe", "channels": []}', "non-empty list"),
        (b'{"op": "subscribe", "channels": ["bbo"], "symbols": ["NOPE"]}', "unknown symbol"),
        (b'{"op": "subscribe", "channels": ["bbo"], "symbols": "BTCUSDT"}', "symbols must"),
        (b'{"op": "subscribe", "channels": ["bbo"], "depth": 3}', "unknown field"),
    ],
)
async def test_a_bad_message_gets_an_error_frame_and_the_connection_lives(
    raw: bytes, says: str
) -> None:
    hub = make_hub(FakeView(SYMBOLS))
    sub, sink = join(hub)

    hub.handle(sub, raw)
    hub.handle(sub, b'{"op": "subscribe", "channels": ["bbo"]}')
    await sent(sub)

    docs = sink.docs()
    assert docs[0]["type"] == "error"
    assert says in str(docs[0]["error"])
    assert [d["type"] for d in docs[1:]] == ["subscribed", "snapshot"]
    assert hub.stats()["bad_messages"] == 1
    assert not sub.closed


async def test_minute_rows_and_venue_status_reach_their_channels() -> None:
    states = {"exchange1": "up", "exchange2": "down"}
    hub = StreamHub(StreamSettings(), SYMBOLS, ManualClock(T0), status_poll=lambda: states)
    sub, sink = join(hub, {"op": "subscribe", "channels": ["aggregates", "status"]})
    await sent(sub)

    row = MinuteRow("exchange1", "BTCUSDT", T0 - 60_000, 10.5, 10.0, 11.0, 4, 60_000)
    hub.publish_rows([row])
    hub.deliver()
    await sent(sub)
    states["exchange2"] = "stale"
    hub.deliver()
    await sent(sub)
    hub.deliver()  # the states did not change: nothing
    await sent(sub)

    docs = sink.docs()
    assert [(d["type"], d.get("channel")) for d in docs] == [
        ("subscribed", None), ("snapshot", "aggregates"), ("snapshot", "status"),
        ("update", "aggregates"), ("update", "status"), ("update", "status"),
    ]  # fmt: skip
    rows = docs[3]["data"]["BTCUSDT"]["rows"]  # type: ignore[index]
    assert rows["exchange1"] == {"minute_ms": T0 - 60_000, "average": 10.5, "low": 10.0,
                                 "high": 11.0, "count": 4, "complete": True}  # fmt: skip
    first = docs[4]["data"]
    assert isinstance(first, dict)
    assert {v: p["state"] for v, p in first.items()} == states | {"exchange2": "down"}
    assert docs[5]["data"]["exchange2"]["state"] == "stale"  # type: ignore[index]
    rounds = [int(str(d["seq"])) for d in docs[3:]]
    assert rounds[0] == rounds[1] < rounds[2]  # one round, one seq on all its frames
    payload_seqs = [docs[3]["data"]["BTCUSDT"]["seq"], first["exchange2"]["seq"],  # type: ignore[index]
                    docs[5]["data"]["exchange2"]["seq"]]  # type: ignore[index]  # fmt: skip
    assert payload_seqs == sorted(payload_seqs)
    assert len(set(payload_seqs)) == 3


async def test_the_world_view_listeners_are_wired_at_construction() -> None:
    view = FakeView(SYMBOLS)
    hub = make_hub(view)
    sub, sink = join(hub, {"op": "subscribe", "channels": ["book", "status"]})
    await sent(sub)

    view.change("SOLUSDT")
    view.status_listeners[0]("fixvenue", "down")
    hub.deliver()
    await sent(sub)

    last = {d["channel"]: d["data"] for d in sink.docs() if d["type"] == "update"}
    assert last["book"] == {"SOLUSDT": {"symbol": "SOLUSDT", "seq": 1, "depth": 10,
                                        "bids": [{"price": 101.0}], "asks": []}}  # fmt: skip
    assert last["status"]["fixvenue"]["state"] == "down"  # type: ignore[index]


async def test_clients_on_all_symbols_share_one_frame() -> None:
    view = FakeView(SYMBOLS)
    hub = make_hub(view)
    pairs = [join(hub, {"op": "subscribe", "channels": ["bbo"]}) for _ in range(3)]
    for sub, _ in pairs:
        await sent(sub)

    view.change("BTCUSDT")
    hub.deliver()
    for sub, _ in pairs:
        await sent(sub)

    bodies = [sink.frames[-1].body for _, sink in pairs]
    assert bodies[0] is bodies[1] is bodies[2]  # built once, the same bytes for everyone


async def test_a_client_on_all_symbols_of_two_channels_gets_one_write_per_round() -> None:
    view = FakeView(SYMBOLS)
    hub = make_hub(view)
    both, both_sink = join(hub, {"op": "subscribe", "channels": ["book", "bbo"]})
    some, some_sink = join(hub, {"op": "subscribe", "channels": ["bbo", "book"],
                                 "symbols": ["ETHUSDT"]})  # fmt: skip
    for sub in (both, some):
        await sent(sub)
    writes, frames = both_sink.writes, len(both_sink.frames)

    view.change("BTCUSDT")
    view.change("ETHUSDT")
    hub.deliver()
    await sent(both)
    await sent(some)

    assert both_sink.writes == writes + 1  # both channels' frames in a single write
    assert [f.channel for f in both_sink.frames[frames:]] == ["bbo", "book"]  # CHANNELS order
    for f in both_sink.frames[frames:]:
        assert set(orjson.loads(f.body)["data"]) == {"BTCUSDT", "ETHUSDT"}
    tail = [orjson.loads(f.body) for f in some_sink.frames[-2:]]
    assert [(d["channel"], set(d["data"])) for d in tail] == [
        ("bbo", {"ETHUSDT"}),
        ("book", {"ETHUSDT"}),
    ]
    assert hub.frames_by_channel["bbo"] >= 2
    assert hub.frames_by_channel["book"] >= 2

    # Behind (its transport holds bytes): no bundle, the update waits, conflated.
    both_sink.held = 1
    view.change("BTCUSDT")
    hub.deliver()
    assert both_sink.writes == writes + 1
    assert set(both.pending) == {"bbo", "book"}


async def test_aclose_closes_every_client_with_1001() -> None:
    hub = make_hub()
    _, sink = join(hub, {"op": "subscribe", "channels": ["ticks"]})
    await hub.start()

    await hub.aclose()
    await hub.aclose()

    assert sink.closed_with == (1001, "server stopping")
    with pytest.raises(Refused):
        join(hub)
