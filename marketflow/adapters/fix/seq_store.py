"""The sequence numbers of one FIX session, kept in a small file so they survive restarts.

QuickFIX keeps them in its FileStore (``*.seqnums``); without them every reconnect would need
ResetSeqNumFlag and everything the venue sent while we were away would be lost. One file per
venue, ``<data_dir>/fix/<name>.seq``, one JSON object::

    {"version": 1, "sender": "MARKETFLOW", "target": "VENUE", "next_out": 12, "next_in": 345}

``next_out`` is the MsgSeqNum our next message will carry; it is saved before a message with
a lower number is written, so it never goes backwards across a crash. ``next_in`` is the next
MsgSeqNum expected from the venue, saved from time to time and at every disconnect: a restart
resumes from it when the core has no durable mark of its own. Writes are atomic (temporary
file, fsync, rename, fsync of the directory): a crash leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import orjson

log = logging.getLogger("marketflow.fix.seq_store")

_VERSION = 1


@dataclass(frozen=True, slots=True)
class SeqNums:
    next_out: int
    next_in: int


class SequenceStore:
    """The sequence-number file of one session (``sender`` -> ``target``)."""

    def __init__(self, path: Path, sender: str, target: str) -> None:
        self.path = path
        self.sender = sender
        self.target = target
        self.saved: SeqNums | None = None  # what the file holds, as far as we know
        self.errors = 0

    @classmethod
    def for_venue(cls, data_dir: Path, name: str, sender: str, target: str) -> SequenceStore:
        return cls(data_dir / "fix" / f"{name}.seq", sender, target)

    def load(self) -> SeqNums | None:
        """The saved numbers, or None when there is no usable file (absent, unreadable,
        malformed, or written for another pair of CompIDs: a different session)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.errors += 1
            log.warning("fix_seq_store_unreadable path=%s error=%s", self.path, exc)
            return None
        try:
            data = orjson.loads(raw)
            nums = SeqNums(int(data["next_out"]), int(data["next_in"]))
            same = (data.get("sender"), data.get("target")) == (self.sender, self.target)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            self.errors += 1
            log.warning("fix_seq_store_malformed path=%s sample=%r", self.path, raw[:200])
            return None
        if nums.next_out < 1 or nums.next_in < 1:
            self.errors += 1
            log.warning("fix_seq_store_malformed path=%s sample=%r", self.path, raw[:200])
            return None
        if not same:
            log.warning(
                "fix_seq_store_other_session path=%s sender=%s target=%s",
                self.path,
                data.get("sender"),
                data.get("target"),
            )
            return None
        self.saved = nums
        return nums

    def save(self, next_out: int, next_in: int) -> bool:
        """Write both numbers atomically; False (logged, counted) when the disk refuses."""
        nums = SeqNums(next_out, next_in)
        if nums == self.saved:
            return True
        body = orjson.dumps(
            {
                "version": _VERSION,
                "sender": self.sender,
                "target": self.target,
                "next_out": next_out,
                "next_in": next_in,
            }
        )
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, body + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            self.errors += 1
            log.warning("fix_seq_store_write_failed path=%s error=%s", self.path, exc)
            return False
        self.saved = nums
        return True


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (POSIX); not every platform can open a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
