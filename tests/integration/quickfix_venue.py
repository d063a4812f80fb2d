"""A QuickFIX 4.4 acceptor acting as a market-data venue, run as a subprocess by the tests.

``python -m tests.integration.quickfix_venue WORKDIR PORT``. QuickFIX's Python binding can
segfault when it stops, so it lives in its own process; the test talks to it by lines:
stdin takes ``publish on|off``, ``skip N`` (move our next MsgSeqNum N ahead: a gap QuickFIX
fills with a GapFill) and ``quit``; stdout gets one JSON object per event: ``ready``,
``logon``, ``logout``, ``in``/``out`` (every message, with its fields) and ``trade`` (every
trade QuickFIX numbered for the initiator: the oracle; resends are not trades).
Settings are as strict as QuickFIX gets (data dictionary, field order, empty values, CompIDs,
latency) with a FileStore that persists every message, so ResendRequests get real resends.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import quickfix as fix
import quickfix44 as fix44

SOH = "\x01"
SYMBOLS = ("BTCUSDT", "ETHUSDT")
SETTINGS = """[DEFAULT]
StartTime=00:00:00
EndTime=00:00:00
FileStorePath={work}/store
FileLogPath={work}/logs
UseDataDictionary=Y
ValidateUserDefinedFields=Y
ValidateFieldsOutOfOrder=Y
ValidateFieldsHaveValues=Y
AllowUnknownMsgFields=N
CheckCompID=Y
CheckLatency=Y
MaxLatency=120
PersistMessages=Y
ResetOnLogon=N
ResetOnLogout=N
ResetOnDisconnect=N

[SESSION]
ConnectionType=acceptor
SocketAcceptHost=127.0.0.1
SocketAcceptPort={port}
BeginString=FIX.4.4
SenderCompID=QFVENUE
TargetCompID=MARKETFLOW
DataDictionary={spec}/FIX44.xml
"""

_out_lock = threading.Lock()


def emit(event: str, **data: Any) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
        sys.stdout.flush()


def fields_of(msg: Any) -> list[tuple[int, str]]:
    text: str = msg.toString()
    return [(int(t), v) for t, _, v in (p.partition("=") for p in text.split(SOH)[:-1])]


class Venue(fix.Application):  # type: ignore[misc]  # quickfix has no type stubs
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.RLock()
        self.session_id: Any = None
        self.subs: dict[str, list[str]] = {}
        self.mids = {"BTCUSDT": 100000.0, "ETHUSDT": 3050.0}
        self.rng = random.Random(7)
        self.trade_no = 0
        self.publishing = threading.Event()

    def onCreate(self, session_id: Any) -> None:
        self.session_id = session_id

    def onLogon(self, session_id: Any) -> None:
        emit("logon")

    def onLogout(self, session_id: Any) -> None:
        with self.lock:
            self.subs.clear()
        emit("logout")

    def toAdmin(self, msg: Any, session_id: Any) -> None:
        emit("out", fields=fields_of(msg))

    def fromAdmin(self, msg: Any, session_id: Any) -> None:
        emit("in", fields=fields_of(msg))

    def toApp(self, msg: Any, session_id: Any) -> None:
        fields = fields_of(msg)
        emit("out", fields=fields)

    def fromApp(self, msg: Any, session_id: Any) -> None:
        fields = fields_of(msg)
        emit("in", fields=fields)
        values = dict(fields)
        if values.get(35) != "V":
            return
        with self.lock:
            req_id = values.get(262, "")
            if values.get(263) == "2":
                self.subs.pop(req_id, None)
                return
            symbols = [v for t, v in fields if t == 55]
            self.subs[req_id] = symbols
            for symbol in symbols:
                self._snapshot(req_id, symbol)

    def _snapshot(self, req_id: str, symbol: str) -> None:
        msg = fix44.MarketDataSnapshotFullRefresh()
        msg.setField(fix.MDReqID(req_id))
        msg.setField(fix.Symbol(symbol))
        mid = self.mids[symbol]
        for kind, price in (("0", mid - 1.0), ("1", mid + 1.0), ("2", mid)):
            entry = fix44.MarketDataSnapshotFullRefresh.NoMDEntries()
            entry.setField(fix.MDEntryType(kind))
            entry.setField(fix.StringField(270, f"{price:.2f}"))
            entry.setField(fix.MDEntrySize(1))
            msg.addGroup(entry)
        fix.Session.sendToTarget(msg, self.session_id)

    def publish_once(self) -> None:
        with self.lock:
            session = fix.Session.lookupSession(self.session_id)
            if not self.publishing.is_set() or session is None or not session.isLoggedOn():
                return
            for req_id, symbols in list(self.subs.items()):
                self._incremental(req_id, symbols)

    def _incremental(self, req_id: str, symbols: list[str]) -> None:
        msg = fix44.MarketDataIncrementalRefresh()
        msg.setField(fix.MDReqID(req_id))
        now_ms = time.time_ns() // 1_000_000
        stamp = time.strftime("%H:%M:%S", time.gmtime(now_ms // 1000)) + f".{now_ms % 1000:03d}"
        trades = []
        for symbol in symbols:
            mid = self.mids[symbol] = round(self.mids[symbol] * self.rng.uniform(0.999, 1.001), 2)
            self.trade_no += 1
            trade_id = f"QF{self.trade_no}"
            for action, kind, price in (
                ("1", "0", mid - 0.5),
                ("1", "1", mid + 0.5),
                ("0", "2", mid),
            ):
                entry = fix44.MarketDataIncrementalRefresh.NoMDEntries()
                entry.setField(fix.MDUpdateAction(action))
                entry.setField(fix.MDEntryType(kind))
                entry.setField(fix.Symbol(symbol))
                entry.setField(fix.StringField(270, f"{price:.2f}"))
                entry.setField(fix.MDEntrySize(2))
                entry.setField(fix.StringField(273, stamp))
                if kind == "2":  # FIX 4.4 has no TradeID (1003): MDEntryID names the trade
                    entry.setField(fix.MDEntryID(trade_id))
                msg.addGroup(entry)
            trades.append({"symbol": symbol, "price": round(mid, 2), "ts": now_ms})
        fix.Session.sendToTarget(msg, self.session_id)  # numbered and stored even if not sent
        for trade in trades:
            emit("trade", **trade)

    def skip(self, n: int) -> None:
        with self.lock:
            session = fix.Session.lookupSession(self.session_id)
            session.setNextSenderMsgSeqNum(session.getExpectedSenderNum() + n)


def main() -> int:
    work, port = Path(sys.argv[1]), int(sys.argv[2])
    spec = Path(sys.prefix, "share", "quickfix")
    cfg = work / "quickfix.cfg"
    cfg.write_text(SETTINGS.format(work=work, port=port, spec=spec))
    settings = fix.SessionSettings(str(cfg))
    app = Venue()
    acceptor = fix.SocketAcceptor(
        app, fix.FileStoreFactory(settings), settings, fix.FileLogFactory(settings)
    )
    acceptor.start()
    stop = threading.Event()

    def publisher() -> None:
        while not stop.wait(0.05):
            if app.publishing.is_set():
                app.publish_once()

    thread = threading.Thread(target=publisher, daemon=True)
    thread.start()
    emit("ready")
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words == ["publish", "on"]:
            app.publishing.set()
        elif words == ["publish", "off"]:
            with app.lock:  # once this returns, no incremental is half-sent
                app.publishing.clear()
            emit("published_off")
        elif words[0] == "skip":
            app.skip(int(words[1]))
            emit("skipped")
        elif words[0] == "quit":
            break
    stop.set()
    thread.join(2)
    emit("bye")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
