"""The aggregate role's view of feeds read by ingest nodes (adapters/kafka/feed_status.py):
the newest status per venue, and no heartbeat within the session timeout = disconnected."""

from __future__ import annotations

import orjson

from marketflow.adapters.kafka.feed_status import FeedStatusReader
from marketflow.settings import KafkaSettings
from tests.unit.fakes import ManualClock

T0 = 1_795_482_600_000


def _status(exchange: str, state: str) -> bytes:
    doc = {"v": 1, "exchange": exchange, "state": state, "node": "i1", "at_ms": T0}
    return orjson.dumps(doc)


def test_heartbeats_keep_a_venue_connected_and_their_absence_disconnects_it() -> None:
    clock = ManualClock(T0)
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:9092", session_timeout_ms=1500,
                             heartbeat_interval_ms=300)  # fmt: skip
    reader = FeedStatusReader(settings, ["ex1", "ex2"], clock)
    assert reader.healthy() == []  # never heard of: down
    reader._take(_status("ex1", "connected"), clock())
    reader._take(_status("ex3", "stale"), clock())  # a venue this config does not name
    clock.now_ms += 1500
    assert reader.healthy() == ["ex1"]
    by_name = {st.name: st for st in reader.statuses()}
    assert by_name["ex3"].stale
    assert not by_name["ex2"].connected
    clock.now_ms += 1  # past the session timeout without a heartbeat
    assert reader.healthy() == []
    reader._take(_status("ex1", "disconnected"), clock())
    assert reader.healthy() == []
    reader._take(b"{not json", clock())
    reader._take(_status("ex1", "sleepy"), clock())
    assert reader.bad == 2
