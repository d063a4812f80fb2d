"""A QuickFIX 4.4 initiator subscribing to the daemon's FIX market-data server (a subprocess).

``python -m tests.e2e.quickfix_consumer WORKDIR PORT``. QuickFIX's Python binding can segfault
when it stops, so it lives in its own process; the test talks to it by lines: stdin takes
``gap N`` (lower the MsgSeqNum QuickFIX expects from us by N: our next message looks too high,
QuickFIX must send a ResendRequest and accept our GapFill) and ``quit``; stdout gets one JSON
object per event: ``ready``, ``logon``, ``logout``, ``in`` / ``out`` (every message, with its
fields) and ``gap``. Strict settings (data dictionary, field order, values) and a FileStore in
WORKDIR, so its sequence numbers survive the daemon's restart as a real consumer's do; on
every logon it subscribes (263=1, 264=1, bids and offers) to every pair.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import quickfix as fix

SOH = "\x01"
SYMBOLS = ("BTCUSDT", "DOGEUSDT", "TONUSDT", "SOLUSDT", "ETHUSDT")
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
ReconnectInterval=1

[SESSION]
ConnectionType=initiator
SocketConnectHost=127.0.0.1
SocketConnectPort={port}
BeginString=FIX.4.4
SenderCompID=CONSUMER
TargetCompID=MARKETFLOW
HeartBtInt=2
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


class Consumer(fix.Application):  # type: ignore[misc]  # quickfix has no type stubs
    def __init__(self) -> None:
        super().__init__()
        self.session_id: Any = None
        self.logons = 0

    def onCreate(self, session_id: Any) -> None:
        self.session_id = session_id

    def onLogon(self, session_id: Any) -> None:
        self.logons += 1
        emit("logon")
        msg = fix.Message()
        msg.getHeader().setField(fix.MsgType("V"))
        msg.setField(fix.MDReqID(f"SUB-{self.logons}"))
        msg.setField(fix.SubscriptionRequestType("1"))
        msg.setField(fix.MarketDepth(1))
        msg.setField(fix.MDUpdateType(1))
        for kind in ("0", "1"):
            group = fix.Group(267, 269)
            group.setField(fix.MDEntryType(kind))
            msg.addGroup(group)
        for symbol in SYMBOLS:
            group = fix.Group(146, 55)
            group.setField(fix.Symbol(symbol))
            msg.addGroup(group)
        fix.Session.sendToTarget(msg, session_id)

    def onLogout(self, session_id: Any) -> None:
        emit("logout")

    def toAdmin(self, msg: Any, session_id: Any) -> None:
        emit("out", fields=fields_of(msg))

    def fromAdmin(self, msg: Any, session_id: Any) -> None:
        emit("in", fields=fields_of(msg))

    def toApp(self, msg: Any, session_id: Any) -> None:
        emit("out", fields=fields_of(msg))

    def fromApp(self, msg: Any, session_id: Any) -> None:
        emit("in", fields=fields_of(msg))

    def gap(self, n: int) -> None:
        session = fix.Session.lookupSession(self.session_id)
        expected = session.getExpectedTargetNum()
        session.setNextTargetMsgSeqNum(expected - n)
        emit("gap", expected=expected, now=expected - n)


def main() -> int:
    work, port = Path(sys.argv[1]), int(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    spec = Path(sys.prefix, "share", "quickfix")
    cfg = work / "quickfix.cfg"
    cfg.write_text(SETTINGS.format(work=work, port=port, spec=spec))
    settings = fix.SessionSettings(str(cfg))
    app = Consumer()
    initiator = fix.SocketInitiator(
        app, fix.FileStoreFactory(settings), settings, fix.FileLogFactory(settings)
    )
    initiator.start()
    emit("ready")
    for line in sys.stdin:
        words = line.split()
        if words and words[0] == "gap":
            app.gap(int(words[1]))
        elif words == ["quit"]:
            break
    emit("bye")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
