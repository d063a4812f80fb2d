"""Processes for end-to-end tests: exchange simulators and the daemon, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from tests.harness.services import free_port

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def _wait_port(port: int, timeout: float) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


class Proc:
    """A child process with its output in a log file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env
        )
        log.close()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        """SIGTERM, and assert a clean exit within the stop timeout; a process that had to
        be killed says where it stood (its log's tail)."""
        code = self.stop(signal.SIGTERM)
        assert code == 0, f"exit {code} on SIGTERM\n--- log tail ---\n{self.log()[-4000:]}"


class Simulator(Proc):
    def __init__(
        self, tmp: Path, name: str, protocol: str = "json", *extra: str, port: int | None = None
    ) -> None:
        self.port = port if port is not None else free_port()
        self.name = name
        super().__init__(
            [
                sys.executable,
                "-m",
                "marketflow.simulator",
                "--protocol",
                protocol,
                "--port",
                str(self.port),
                *extra,
            ],
            tmp / f"sim-{name}.log",
        )

    def start(self) -> None:
        super().start()
        assert _wait_port(self.port, 10), f"simulator {self.name} did not listen:\n{self.log()}"


class Daemon(Proc):
    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.config_path = tmp / "config.toml"
        self.config_path.write_text(to_toml(config))
        super().__init__(
            [
                sys.executable,
                "-m",
                "marketflow",
                "--port",
                str(self.port),
                "--config",
                str(self.config_path),
            ],
            tmp / "daemon.log",
        )

    def start(self) -> None:
        super().start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc is not None
            assert self.proc.poll() is None, f"daemon exited:\n{self.log()}"
            try:
                self.get("/health")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
            else:
                return
        raise AssertionError(f"daemon did not answer /health:\n{self.log()}")

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback only
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def wait_for(self, path: str, check: Any, timeout: float = 20) -> Any:
        """Poll ``path`` until ``check(status, body)`` is true; return the body."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.get(path)
                if check(*last):
                    return last[1]
            except (urllib.error.URLError, ConnectionError) as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(
            f"{path} never satisfied the check; last: {last}\n{self.log()[-3000:]}"
        )


def poll(fetch: Callable[[], T], check: Callable[[T], bool], timeout: float, what: str) -> T:
    """Call ``fetch`` until ``check`` holds for its result; the result, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = fetch()
        if check(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout} s; last: {got!r:.3000}")
        time.sleep(0.2)


def feed_time_ms(body: Any) -> float:
    return datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00")).timestamp() * 1000


def wait_feed_time(d: Daemon, epoch_s: float, path: str = "/prices/latest/BTCUSDT") -> None:
    """Until the daemon serves a tick stamped at or after ``epoch_s`` (the feed's own clock)."""
    d.wait_for(
        path,
        lambda s, b: s == 200 and feed_time_ms(b) >= epoch_s * 1000,
        timeout=max(20.0, epoch_s - time.time() + 20),
    )


def assert_real_stack(d: Daemon) -> dict[str, Any]:
    """The daemon runs on PostgreSQL and Redis (no embedded fallback); its /health."""
    health: dict[str, Any] = d.wait_for(
        "/health", lambda s, b: b["postgres"]["state"] == "up" and b["redis"]["state"] == "up"
    )
    assert health["postgres"]["kind"] == "postgres", health
    assert health["redis"]["kind"] == "redis", health
    if "capture" in health:
        assert health["capture"]["store"] == "postgres", health
    assert "storage_embedded" not in d.log()
    assert "cache_embedded" not in d.log()
    return health


def to_toml(doc: dict[str, Any]) -> str:
    """Just enough TOML for test configs: scalars, lists of scalars, tables, arrays of tables."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        return json.dumps(str(v))

    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for k, v in doc.items():
        if isinstance(v, dict) or (isinstance(v, list) and v and isinstance(v[0], dict)):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {scalar(v)}")
    for k, v in tables:
        items = v if isinstance(v, list) else [v]
        for item in items:
            lines.append(f"[[{k}]]" if isinstance(v, list) else f"[{k}]")
            lines.extend(f"{ik} = {scalar(iv)}" for ik, iv in item.items())
    return "\n".join(lines) + "\n"


async def minute_rows(dsn: str, exchange: str | None = None) -> list[asyncpg.Record]:
    """Minute rows as stored (with ``minute_ms``, the minute start in epoch ms), oldest first."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT exchange, pair_name, timestamp, "
            "(extract(epoch FROM timestamp) * 1000)::bigint AS minute_ms, "
            "average_price, min_price, max_price, tick_count FROM minute_prices "
            "WHERE $1::text IS NULL OR exchange = $1 ORDER BY timestamp, exchange, pair_name",
            exchange,
        )
    finally:
        await conn.close()
