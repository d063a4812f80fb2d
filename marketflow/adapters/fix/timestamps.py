"""FIX UTC timestamps (``YYYYMMDD-HH:MM:SS[.sss]``) to and from Unix epoch milliseconds.

``datetime.strptime`` costs more than parsing a whole market-data message; the date
part changes once a day, so its epoch value is cached and only the time of day is computed.
"""

from __future__ import annotations

import calendar
import time

_DAY_MS = 86_400_000
_date_cache: dict[bytes, int] = {}
# Entries of one message, and messages of one millisecond, share their times: memoise them.
_tod_cache: dict[bytes, int] = {}
_utc_cache: dict[bytes, int] = {}
_CACHE_MAX = 4096


def format_utc(ms: int) -> str:
    """``YYYYMMDD-HH:MM:SS.sss`` for epoch milliseconds ``ms``."""
    secs, millis = divmod(ms, 1000)
    return time.strftime("%Y%m%d-%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}"


def format_utc_time(ms: int) -> str:
    """``HH:MM:SS.sss`` (UTCTimeOnly, as in MDEntryTime 273) for epoch milliseconds ``ms``."""
    return format_utc(ms)[9:]


def date_ms(date: bytes) -> int:
    """Epoch milliseconds of midnight UTC of ``YYYYMMDD``; ValueError when it is not a date."""
    cached = _date_cache.get(date)
    if cached is not None:
        return cached
    if len(date) != 8 or not date.isdigit():
        raise ValueError(f"not a FIX date: {date!r}")
    year, month, day = int(date[:4]), int(date[4:6]), int(date[6:])
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]):
        raise ValueError(f"not a FIX date: {date!r}")
    value = calendar.timegm((year, month, day, 0, 0, 0)) * 1000
    if len(_date_cache) > 64:  # a feed sees one or two dates a day: never let it grow
        _date_cache.clear()
    _date_cache[date] = value
    return value


def time_of_day_ms(value: bytes) -> int:
    """Milliseconds since midnight of ``HH:MM:SS[.s...]``; ValueError when malformed."""
    cached = _tod_cache.get(value)
    if cached is not None:
        return cached
    if len(_tod_cache) >= _CACHE_MAX:
        _tod_cache.clear()
    ms = _tod_cache[value] = _time_of_day_ms(value)
    return ms


def _time_of_day_ms(value: bytes) -> int:
    if len(value) < 8 or value[2] != 0x3A or value[5] != 0x3A:  # ":"
        raise ValueError(f"not a FIX time: {value!r}")
    hh, mm, ss = value[:2], value[3:5], value[6:8]
    if not (hh.isdigit() and mm.isdigit() and ss.isdigit()):
        raise ValueError(f"not a FIX time: {value!r}")
    h, m, s = int(hh), int(mm), int(ss)
    if h > 23 or m > 59 or s > 60:  # 60: a leap second
        raise ValueError(f"not a FIX time: {value!r}")
    millis = 0
    if len(value) > 8:
        frac = value[9:]
        if value[8] != 0x2E or not frac.isdigit():  # "."
            raise ValueError(f"not a FIX time: {value!r}")
        millis = int((frac + b"00")[:3])  # micro/nanoseconds are truncated to milliseconds
    return ((h * 60 + m) * 60 + s) * 1000 + millis


def parse_utc(value: bytes) -> int:
    """Epoch milliseconds of a UTCTimestamp ``YYYYMMDD-HH:MM:SS[.sss]``; ValueError if bad."""
    cached = _utc_cache.get(value)
    if cached is not None:
        return cached
    if len(value) < 17 or value[8] != 0x2D:  # "-"
        raise ValueError(f"not a FIX timestamp: {value!r}")
    if len(_utc_cache) >= _CACHE_MAX:
        _utc_cache.clear()
    ms = _utc_cache[value] = date_ms(value[:8]) + _time_of_day_ms(value[9:])
    return ms


def entry_time_ms(entry_time: bytes, sending_ms: int, entry_date: bytes | None = None) -> int:
    """Epoch ms of an MDEntryTime (273), dated by MDEntryDate (272) or by the SendingTime.

    Without an MDEntryDate an entry stamped just before midnight and sent just after it belongs
    to the previous day: a time more than an hour after the sending time is taken as that.
    """
    tod = time_of_day_ms(entry_time)
    if entry_date is not None:
        return date_ms(entry_date) + tod
    midnight = sending_ms - sending_ms % _DAY_MS
    ts = midnight + tod
    if ts - sending_ms > 3_600_000:
        ts -= _DAY_MS
    return ts
