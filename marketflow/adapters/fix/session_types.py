"""The vocabulary of the FIX session: its settings, state, statistics and errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from marketflow.domain.errors import MarketflowError


class FixSessionError(MarketflowError):
    """The session cannot go on (logon refused, logout, sequence too low): reconnect."""


class LinkDead(FixSessionError):
    """Nothing received for 2 x HeartBtInt (or the configured limit), or no logon answer."""


class Transport(Protocol):
    def write(self, data: bytes, /) -> None: ...


class SessionState(enum.Enum):
    CREATED = "created"
    LOGON_SENT = "logon_sent"
    ACTIVE = "active"
    LOGOUT_SENT = "logout_sent"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Who we are, whom we talk to, what we subscribe to, liveness and recovery settings."""

    sender: str
    target: str
    symbols: tuple[str, ...]
    heartbeat_s: int = 30
    begin: str = "FIX.4.4"
    test_request_after_s: float | None = None  # silence before a TestRequest; 1.2 x HeartBtInt
    dead_after_s: float | None = None  # silence before the link is dead; 2 x HeartBtInt
    logon_timeout_s: float = 10.0
    reset_on_logon: bool = False  # Logon with 141=Y: both sides start again at 1 (QuickFIX)
    resend_chunk_size: int = 0  # MsgSeqNums per ResendRequest; 0: one open-ended request
    resend_timeout_s: float = 10.0  # a gap open this long without progress is given up
    max_held: int = 100_000  # messages held above a gap before it is given up
    market_depth: int = 1  # MarketDepth (264) of the subscription


@dataclass(slots=True)
class SessionStats:
    gaps: int = 0
    missed_messages: int = 0
    resend_requests: int = 0
    resends_applied: int = 0
    duplicates: int = 0
    gaps_recovered: int = 0
    gaps_abandoned: int = 0
    resubscribes: int = 0
    venue_resets: int = 0
    venue_rejects: int = 0
    md_request_rejects: int = 0
    rejects_sent: int = 0
    test_requests_sent: int = 0
