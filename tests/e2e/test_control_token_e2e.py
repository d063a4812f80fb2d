"""The control token as users set it: from the environment, on the daemon as it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.procs import ROOT, Daemon, to_toml
from tests.harness.services import free_port

pytestmark = pytest.mark.e2e

TOKEN = "e2e-control-token-0123456789"  # noqa: S105 - a test value, no secret


def _config(tmp: Path) -> dict[str, object]:
    """Embedded stores, one live source nobody serves (it reconnects), no capture."""
    return {
        "http": {"host": "127.0.0.1", "port": 0},
        "postgres": {"dsn": ""},
        "redis": {"url": ""},
        "embedded": {"data_dir": str(tmp / "var")},
        "capture": {"enabled": False},
        "exchanges": [{"name": "exchange1", "host": "127.0.0.1", "port": free_port()}],
    }


def test_daemon_with_a_token_answers_401_without_it_and_200_with_it(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, _config(tmp_path))
    daemon.env["MARKETFLOW_HTTP__CONTROL_TOKEN"] = TOKEN
    daemon.start()
    try:
        missing = daemon.request("POST", "/mode/test")
        wrong = daemon.request("POST", "/mode/test", {"Authorization": "Bearer wrong"})
        ok = daemon.request("POST", "/mode/test", {"Authorization": f"Bearer {TOKEN}"})
        health = daemon.get("/health")[1]
    finally:
        daemon.stop()

    assert (missing[0], wrong[0]) == (401, 401)
    assert "error" in missing[1]
    assert ok == (200, {"mode": "test"})
    assert health["http"] == {"control_unauthorized": 2}
    assert TOKEN not in daemon.log()


def test_daemon_refuses_to_start_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(to_toml(_config(tmp_path)))
    env = {"PATH": "/usr/bin:/bin", "MARKETFLOW_HTTP__HOST": "0.0.0.0"}

    proc = subprocess.run(
        [sys.executable, "-m", "marketflow", "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert proc.returncode == 2, proc.stderr
    assert "not a loopback address and no http.control_token" in proc.stderr
    assert "Traceback" not in proc.stderr
