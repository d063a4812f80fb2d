"""The per-venue FIX sequence-number file: atomic, validated, never mistaken for another."""

from __future__ import annotations

from pathlib import Path

import orjson

from marketflow.adapters.fix.seq_store import SeqNums, SequenceStore


def test_round_trip_and_file_layout(tmp_path: Path) -> None:
    store = SequenceStore.for_venue(tmp_path, "venue1", "MF", "VENUE")
    assert store.load() is None
    assert store.save(12, 345)
    assert store.path == tmp_path / "fix" / "venue1.seq"
    assert orjson.loads(store.path.read_bytes()) == {
        "version": 1,
        "sender": "MF",
        "target": "VENUE",
        "next_out": 12,
        "next_in": 345,
    }
    assert [p.name for p in store.path.parent.iterdir()] == ["venue1.seq"]  # no tmp left
    again = SequenceStore.for_venue(tmp_path, "venue1", "MF", "VENUE")
    assert again.load() == SeqNums(12, 345)


def test_malformed_or_foreign_file_is_not_used(tmp_path: Path) -> None:
    store = SequenceStore.for_venue(tmp_path, "v", "MF", "VENUE")
    store.path.parent.mkdir(parents=True)
    for body in (b"{not json", b'{"next_out": 0, "next_in": 5}', b"[1, 2]", b'{"next_in": 3}'):
        store.path.write_bytes(body)
        assert store.load() is None
    assert store.errors == 4
    other = SequenceStore.for_venue(tmp_path, "v", "MF", "OTHER")
    assert other.save(5, 6)
    assert store.load() is None  # written for another session
    assert store.errors == 4


def test_unwritable_directory_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "fix"
    blocker.write_text("a file where the directory should be")
    store = SequenceStore.for_venue(tmp_path, "v", "MF", "VENUE")
    assert not store.save(1, 1)
    assert store.errors == 1
