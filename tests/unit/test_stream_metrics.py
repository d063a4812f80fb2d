"""The stream hub's figures in /metrics: gauges of connections and subscribers, counters of
frames, conflation, 1008 closes and refusals, labelled per channel and never per client."""

from __future__ import annotations

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from marketflow.app.stream_hub import Refused
from marketflow.entrypoints.metrics import stream_metrics
from tests.unit.stream_kit import SYMBOLS, FakeView
from tests.unit.test_stream_hub import join, make_hub, sent


def samples(hub: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    class One(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            return stream_metrics(hub)  # type: ignore[arg-type]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


async def test_stream_families_count_per_channel() -> None:
    view = FakeView(SYMBOLS, pad=600)
    hub = make_hub(view, max_connections=2, max_subscriptions=2, max_buffered_bytes=4096)
    slow, slow_sink = join(hub, {"op": "subscribe", "channels": ["bbo"]})
    fast, _ = join(hub, {"op": "subscribe", "channels": ["bbo", "status"]})
    await sent(slow)
    await sent(fast)
    with pytest.raises(Refused):
        join(hub)
    hub.handle(fast, orjson.dumps({"op": "subscribe", "channels": ["book", "ticks"]}))
    slow_sink.held = 1
    while hub.slow_closed == 0:
        for s in SYMBOLS:
            view.change(s)
        hub.deliver()
        await sent(fast)

    got = samples(hub)

    assert got[("marketflow_stream_connections", ())] == 1
    assert got[("marketflow_stream_subscribers", (("channel", "bbo"),))] == 1
    assert got[("marketflow_stream_subscribers", (("channel", "status"),))] == 1
    assert got[("marketflow_stream_subscribers", (("channel", "ticks"),))] == 0
    frames = {dict(labels)["channel"]: n for (name, labels), n in got.items()
              if name == "marketflow_stream_frames_sent_total"}  # fmt: skip
    # subscribed x 2 and one error; a status snapshot; bbo snapshots and updates the rest
    assert (frames["control"], frames["status"], frames["ticks"]) == (3, 1, 0)
    assert frames["bbo"] == fast.frames_sent + slow.frames_sent - 4 > 2
    assert sum(frames.values()) == hub.frames_sent
    assert got[("marketflow_stream_conflated_total", (("channel", "bbo"),))] == slow.conflated > 0
    assert got[("marketflow_stream_conflated_total", (("channel", "book"),))] == 0
    assert got[("marketflow_stream_slow_closed_total", ())] == 1
    assert got[("marketflow_stream_connections_refused_total", ())] == 1
    assert got[("marketflow_stream_subscriptions_refused_total", ())] == 1
    assert got[("marketflow_stream_bytes_sent_total", ())] == hub.bytes_sent > 0
    assert {dict(labels).get("channel") for _, labels in got} <= {
        None, "ticks", "bbo", "book", "aggregates", "status", "control"}  # fmt: skip
