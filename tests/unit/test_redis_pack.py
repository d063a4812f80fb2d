"""The flusher's own RESP framing (redis_cache._pack) is byte for byte redis-py's."""

from __future__ import annotations

from redis.connection import Connection

from marketflow.adapters.redis_cache import _pack


def redis_py(*args: str | bytes | int) -> bytes:
    return b"".join(Connection().pack_command(*args))  # type: ignore[no-untyped-call]


def test_pack_matches_redis_py_for_keys_numbers_bytes_and_non_ascii_text() -> None:
    keys = [f"marketflow:window:ex{i}:P{i:04d}USDT:1795482600" for i in range(50)]
    cases: list[tuple[str | bytes | int, ...]] = [
        ("EVALSHA", "a" * 40, 53, *keys, b'[["x"],[]]', b"[[1.5,2,3]]", b""),
        ("HSET", "k", "f", "v"),
        ("SET", "k", b"\x00\r\n\xff", "tail"),
        ("EVALSHA", "sha", 2, "marketflow:window:b\u00f6rse:\u20acUSDT:60", "k2", b"doc"),
        ("PING",),
    ]
    for args in cases:
        assert _pack(args) == redis_py(*args), args
