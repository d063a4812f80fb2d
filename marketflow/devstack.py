"""``make run``: three JSON exchange simulators, two FIX venues, and the daemon, in one terminal.

The two FIX venues serve 5 levels a side around mids that wander about the same start (mean
reversion, different seeds, one offset by 1 bp), so their books overlap and now and then
cross or lock: what the world view (GET /bbo, GET /book) combines.

A simulator is not started where its port is already taken (the reference exchange programs
may be running there). Ctrl-C reaches every process of the group; the daemon drains and
writes its partial minute before exiting.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# (protocol, port, extra arguments): the FIX venue's CompID matches config.toml's fixvenue.
SIMULATORS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("json", 40101, ()),
    ("json", 40102, ()),
    ("json", 40103, ()),
    ("fix", 40111, ("--comp-id", "FIXVENUE")),
)
# -- world view: book options of the FIX venues (overlapping, sometimes crossed or locked)
_BOOK = ("--depth", "5", "--spread", "5e-4", "--volatility", "2e-4", "--revert", "0.05",
         "--tick-bp", "1")  # fmt: skip
SIMULATORS = (
    *SIMULATORS[:3],
    ("fix", 40111, ("--comp-id", "FIXVENUE", "--seed", "1", *_BOOK)),
    ("fix", 40112, ("--comp-id", "FIXVENUE2", "--seed", "2", "--offset", "1e-4", *_BOOK)),
)
# The WebSocket venue of config.toml's wsvenue (Binance-style combined streams): the FIX
# venues' book model, its own seed and offset, so its quotes join theirs in the world view.
_WS_BOOK = ("--spread", "5e-4", "--volatility", "2e-4", "--revert", "0.05", "--tick-bp", "1")
SIMULATORS += (("websocket", 40121, ("--seed", "3", "--offset=-1e-4", *_WS_BOOK)),)


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--config", type=Path, default=Path("config.toml"))
    args = parser.parse_args(argv)
    procs: list[subprocess.Popen[bytes]] = []
    for protocol, port, extra in SIMULATORS:
        if port_taken(port):
            print(f"devstack: port {port} already serves something; using it", file=sys.stderr)
            continue
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "marketflow.simulator",
                    "--protocol",
                    protocol,
                    "--port",
                    str(port),
                    *extra,
                ]
            )
        )
    time.sleep(0.3)

    def forward_term(signum: int, frame: object) -> None:
        # systemd/docker/timeout stop us with SIGTERM: stop the daemon the same way.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, forward_term)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "marketflow", "--port", str(args.port), "--config", str(args.config)]
    )
    try:
        code = daemon.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the whole group already; a SIGTERM reached only us: pass it on.
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        code = daemon.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
    return code


if __name__ == "__main__":
    sys.exit(main())
