"""Periodic schedules with Celery's API: ``schedule`` (interval), ``crontab`` and ``solar``.

Each answers Celery's two questions, ``is_due(last_run_at) -> schedstate(is_due, next)``
and ``remaining_estimate(last_run_at)``. Underneath, each is one pure function,
``next_after(t)``: the first due time strictly after ``t`` (an aware UTC datetime). Beat
needs due times to be a function of the schedule and the clock only, so that several
beats name the same due time the same way and can claim it exactly once (see
``beat.py``); ``last_due(after, now)`` and ``anchor(t)`` build on it.

Time zones: crontab and solar fields are read in the app's zone (``app.conf.tz()``).
Across daylight-saving changes a wall-clock time that does not exist (spring forward)
fires at the same instant as the equivalent time just after the jump, and a wall-clock
time that happens twice (autumn) fires once, on its first occurrence, unless the hour
field is ``*`` (then the repeated hour runs too, as in cron). Interval schedules count
real seconds and ignore zones.
"""

from __future__ import annotations

import calendar
import contextlib
import datetime as dt
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

__all__ = [
    "BaseSchedule",
    "ParseException",
    "crontab",
    "crontab_parser",
    "maybe_schedule",
    "schedstate",
    "schedule",
    "solar",
]

UTC = dt.UTC
_MINUTE = dt.timedelta(minutes=1)
_DAY = dt.timedelta(days=1)
_SCAN = 1000  # slots walked one by one before last_due jumps closer to now


class schedstate(NamedTuple):  # Celery's lowercase name
    is_due: bool
    next: float


class ParseException(ValueError):
    """A crontab field that cannot be parsed; the message names the field and value."""


def _utc(value: dt.datetime, tz: dt.tzinfo | None = None) -> dt.datetime:
    """``value`` as an aware UTC datetime; naive values are read in ``tz`` (else UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz or UTC)
    return value.astimezone(UTC)


def _us(delta: dt.timedelta) -> int:
    return delta // dt.timedelta(microseconds=1)


class BaseSchedule:
    """What every schedule shares: the app (for its zone), ``now`` and Celery's API."""

    def __init__(
        self, nowfun: Callable[[], dt.datetime] | None = None, app: Any = None
    ) -> None:
        self.nowfun = nowfun
        self._app = app

    @property
    def app(self) -> Any:
        if self._app is None:
            from .app import current_app

            return current_app()
        return self._app

    @app.setter
    def app(self, value: Any) -> None:
        self._app = value

    @property
    def tz(self) -> dt.tzinfo:
        zone: dt.tzinfo = self.app.conf.tz()
        return zone

    def now(self) -> dt.datetime:
        if self.nowfun is not None:
            return self.maybe_make_aware(self.nowfun())
        return dt.datetime.now(self.tz)

    def maybe_make_aware(self, value: dt.datetime) -> dt.datetime:
        return value if value.tzinfo is not None else value.replace(tzinfo=self.tz)

    # -- celeriac's core: pure functions of the clock ---------------------------------

    def next_after(self, t: dt.datetime) -> dt.datetime:
        """The first due time strictly after ``t``, as an aware UTC datetime."""
        raise NotImplementedError

    def anchor(self, t: dt.datetime) -> dt.datetime:
        """A starting point at or before ``t`` that every beat computes alike."""
        return _utc(t, self.tz)

    def last_due(self, after: dt.datetime, now: dt.datetime) -> dt.datetime | None:
        """The latest due time in ``(after, now]``, or None if there is none."""
        after, now = _utc(after, self.tz), _utc(now, self.tz)
        known: dt.datetime | None = None
        start, span = after, dt.timedelta(hours=1)
        while True:
            due = self.next_after(start)
            if due > now:
                floor = known or after
                if start <= floor:
                    return known
                span *= 8  # nothing in (start, now]: look further back
                start = max(floor, now - span)
                continue
            for _ in range(_SCAN):
                following = self.next_after(due)
                if following > now:
                    return due
                due = following
            known = due  # many slots in the gap: skip ahead instead of walking them all
            start = max(known, now - span)

    # -- Celery's API ----------------------------------------------------------------

    def remaining_estimate(self, last_run_at: dt.datetime) -> dt.timedelta:
        """Time from now until the first run after ``last_run_at`` (negative if overdue)."""
        nxt = self.next_after(self.maybe_make_aware(last_run_at))
        return nxt - _utc(self.now())

    def is_due(self, last_run_at: dt.datetime | None) -> schedstate:
        """``(True, seconds to the following run)`` when due, else ``(False, seconds left)``."""
        now = _utc(self.now())
        last = now if last_run_at is None else _utc(self.maybe_make_aware(last_run_at))
        remaining = (self.next_after(last) - now).total_seconds()
        if remaining > 0:
            return schedstate(False, remaining)
        return schedstate(True, max((self.next_after(now) - now).total_seconds(), 0.0))


# -- interval ---------------------------------------------------------------------------


def _timedelta(value: Any) -> dt.timedelta:
    if isinstance(value, dt.timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return dt.timedelta(seconds=value)
    raise TypeError(f"run_every must be seconds or a timedelta, not {value!r}")


class schedule(BaseSchedule):  # Celery's lowercase name
    """Every ``run_every`` (seconds or timedelta).

    Due times follow Celery: ``last_run_at + run_every``. A beat that knows nothing yet
    starts from the grid of multiples of ``run_every`` since the Unix epoch
    (:meth:`anchor`), so every beat agrees on the due times. ``relative`` is accepted for
    Celery compatibility; due times are always on that grid under beat.
    """

    def __init__(
        self,
        run_every: float | dt.timedelta | None = None,
        relative: bool = False,
        nowfun: Callable[[], dt.datetime] | None = None,
        app: Any = None,
    ) -> None:
        super().__init__(nowfun, app)
        self.run_every = _timedelta(run_every if run_every is not None else 0)
        if _us(self.run_every) <= 0:
            raise ValueError(f"schedule run_every must be positive, not {run_every!r}")
        self.relative = relative

    @property
    def seconds(self) -> float:
        return self.run_every.total_seconds()

    @property
    def human_seconds(self) -> str:
        secs = self.seconds
        for unit, size in (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0)):
            if secs >= size:
                n = secs / size
                return f"{n:.2f} {unit}{'s' if n != 1 else ''}"
        return f"{secs:.2f} seconds" if secs != 1 else "1.00 second"

    def next_after(self, t: dt.datetime) -> dt.datetime:
        return _utc(t, self.tz) + self.run_every

    def last_due(self, after: dt.datetime, now: dt.datetime) -> dt.datetime | None:
        after, now = _utc(after, self.tz), _utc(now, self.tz)
        step = _us(self.run_every)
        k = _us(now - after) // step
        return after + dt.timedelta(microseconds=k * step) if k >= 1 else None

    def anchor(self, t: dt.datetime) -> dt.datetime:
        epoch = dt.datetime(1970, 1, 1, tzinfo=UTC)
        step = _us(self.run_every)
        return epoch + dt.timedelta(microseconds=_us(_utc(t, self.tz) - epoch) // step * step)

    def __repr__(self) -> str:
        return f"<freq: {self.human_seconds}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, schedule):
            return self.run_every == other.run_every
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.run_every)

    def __reduce__(self) -> tuple[Any, ...]:
        return self.__class__, (self.run_every, self.relative, self.nowfun)


# -- crontab ----------------------------------------------------------------------------

_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_NAMES: dict[str, dict[str, int]] = {
    "day_of_week": {
        **{n: i for i, n in enumerate(_DAY_NAMES)},
        **{calendar.day_name[(i - 1) % 7].lower(): i for i in range(7)},
    },
    "month_of_year": {
        **{n: i + 1 for i, n in enumerate(_MONTH_NAMES)},
        **{calendar.month_name[i].lower(): i for i in range(1, 13)},
    },
}
# field -> (lowest, highest); day_of_week also takes 7 for Sunday, as cron does.
_FIELDS = {
    "minute": (0, 59),
    "hour": (0, 23),
    "day_of_week": (0, 6),
    "day_of_month": (1, 31),
    "month_of_year": (1, 12),
}
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


class crontab_parser:  # Celery's lowercase name
    """Parse one cron field: ``*``, ``*/15``, ``1-5``, ``1-10/2``, ``mon-fri``, ``1,15``."""

    def __init__(self, max_: int = 60, min_: int = 0, field: str | None = None) -> None:
        self.min_, self.max_ = min_, max_
        known = {
            (60, 0): "minute",
            (24, 0): "hour",
            (7, 0): "day_of_week",
            (31, 1): "day_of_month",
            (12, 1): "month_of_year",
        }
        self.field = field or known.get((max_, min_), "field")
        self.high = min_ + max_ - 1

    def parse(self, spec: str) -> set[int]:
        return set(self._parse(str(spec), str(spec)))

    def _fail(self, value: Any, why: str) -> ParseException:
        return ParseException(f"Invalid crontab {self.field}={value!r}: {why}")

    def _number(self, text: str, value: Any) -> int:
        text = text.strip()
        if text.isdigit():
            n = int(text)
        elif text in _NAMES.get(self.field, {}):
            n = _NAMES[self.field][text]
        else:
            raise self._fail(value, f"{text!r} is not a number" + self._names_hint())
        top = 7 if self.field == "day_of_week" else self.high
        if not self.min_ <= n <= top:
            raise self._fail(value, f"{n} is outside {self.min_}-{top}")
        return n

    def _names_hint(self) -> str:
        if self.field == "day_of_week":
            return " or a day name (sun, mon, ...)"
        if self.field == "month_of_year":
            return " or a month name (jan, feb, ...)"
        return ""

    def _parse(self, text: str, value: Any) -> set[int]:
        text = text.strip().lower()
        if not text:
            raise self._fail(value, "empty")
        out: set[int] = set()
        for part in text.split(","):
            body, slash, step_text = part.strip().partition("/")
            step = 1
            if slash:
                if not step_text.strip().isdigit() or int(step_text) < 1:
                    raise self._fail(value, f"step {step_text!r} must be a whole number >= 1")
                step = int(step_text)
            body = body.strip()
            if body in ("*", "?"):
                lo, hi = self.min_, self.high
            elif "-" in body:
                first, _, last = body.partition("-")
                lo, hi = self._number(first, value), self._number(last, value)
            else:
                lo = self._number(body, value)
                hi = self.high if slash else lo
            if lo <= hi:
                seq = list(range(lo, hi + 1))
            else:  # a range across the end, e.g. hour 22-2 or fri-mon
                seq = list(range(lo, self.high + 1)) + list(range(self.min_, hi + 1))
            out.update(seq[::step])
        if self.field == "day_of_week" and 7 in out:
            out.discard(7)
            out.add(0)
        return out

    def expand(self, value: Any) -> frozenset[int]:
        """A field value (int, str, or an iterable of those) as the set of numbers it means."""
        if isinstance(value, bool):
            raise self._fail(value, "expected a number, a cron string or a set")
        if isinstance(value, int):
            return frozenset(self._parse(str(value), value))
        if isinstance(value, str):
            return frozenset(self._parse(value, value))
        if isinstance(value, Iterable):
            out: set[int] = set()
            for item in value:
                out |= self.expand(item)
            if not out:
                raise self._fail(value, "empty")
            return frozenset(out)
        raise self._fail(value, "expected a number, a cron string or a set")


def _field_text(value: Any) -> str:
    if isinstance(value, str | int):
        return str(value)
    return ",".join(str(v) for v in sorted(value, key=str))


class crontab(BaseSchedule):  # Celery's lowercase name
    """Cron-style schedule in the app's zone, with Celery's fields and syntax.

    As in Celery, a restricted ``day_of_month`` and ``day_of_week`` must both match
    (classic cron would accept either). Sunday is 0 (or 7, or ``sun``).
    """

    def __init__(
        self,
        minute: Any = "*",
        hour: Any = "*",
        day_of_week: Any = "*",
        day_of_month: Any = "*",
        month_of_year: Any = "*",
        nowfun: Callable[[], dt.datetime] | None = None,
        app: Any = None,
    ) -> None:
        super().__init__(nowfun, app)
        given = {
            "minute": minute,
            "hour": hour,
            "day_of_week": day_of_week,
            "day_of_month": day_of_month,
            "month_of_year": month_of_year,
        }
        sets: dict[str, frozenset[int]] = {}
        for name, value in given.items():
            low, high = _FIELDS[name]
            sets[name] = crontab_parser(high - low + 1, low, name).expand(value)
        self._orig = {name: _field_text(value) for name, value in given.items()}
        self.minute = sets["minute"]
        self.hour = sets["hour"]
        self.day_of_week = sets["day_of_week"]
        self.day_of_month = sets["day_of_month"]
        self.month_of_year = sets["month_of_year"]
        if not any(d <= _MONTH_DAYS[m - 1] for m in self.month_of_year for d in self.day_of_month):
            raise ParseException(
                f"Invalid crontab: day_of_month={self._orig['day_of_month']!r} never occurs "
                f"in month_of_year={self._orig['month_of_year']!r}"
            )
        self._hours = sorted(self.hour)
        self._minutes = sorted(self.minute)

    @classmethod
    def from_string(cls, text: str) -> crontab:
        """``crontab.from_string('*/5 * * * *')``: minute hour day-of-month month day-of-week."""
        parts = text.split()
        if len(parts) != 5:
            raise ParseException(
                f"Invalid crontab {text!r}: expected 5 fields "
                f"(minute hour day_of_month month_of_year day_of_week)"
            )
        m, h, dom, moy, dow = parts
        return cls(m, h, dow, dom, moy)

    def _matches_day(self, day: dt.datetime) -> bool:
        return (
            day.month in self.month_of_year
            and day.day in self.day_of_month
            and (day.weekday() + 1) % 7 in self.day_of_week
        )

    def _next_match(self, start: dt.datetime) -> dt.datetime:
        """The first naive wall-clock minute at or after ``start`` matching every field."""
        d = start
        limit = start + dt.timedelta(days=29 * 366)  # every date/weekday pairing recurs
        while d < limit:
            if d.month not in self.month_of_year:
                d = dt.datetime(d.year + d.month // 12, d.month % 12 + 1, 1)
                continue
            if self._matches_day(d):
                for h in self._hours:
                    if h < d.hour:
                        continue
                    for m in self._minutes:
                        if h == d.hour and m < d.minute:
                            continue
                        return d.replace(hour=h, minute=m)
            d = dt.datetime(d.year, d.month, d.day) + _DAY
        raise ParseException(f"{self!r} never matches")

    def _search(
        self, start: dt.datetime, after: dt.datetime, tz: dt.tzinfo, folds: tuple[int, ...]
    ) -> dt.datetime:
        naive = start.replace(tzinfo=None, second=0, microsecond=0) + _MINUTE
        while True:
            cand = self._next_match(naive)
            for fold in folds:
                due = cand.replace(tzinfo=tz, fold=fold).astimezone(UTC)
                if due > after:
                    return due
            naive = cand + _MINUTE

    def next_after(self, t: dt.datetime) -> dt.datetime:
        tz = self.tz
        after = _utc(t, tz)
        local = after.astimezone(tz)
        due = self._search(local, after, tz, (0, 1))
        if len(self.hour) == 24:
            # Autumn: the clock goes back and an hour repeats. A job that runs every hour
            # also runs in the repeat (cron does the same); fixed-hour jobs run once.
            offset = local.utcoffset()
            later = (after + dt.timedelta(hours=3)).astimezone(tz).utcoffset()
            if offset is not None and later is not None and later < offset:
                again = self._search(after + later, after, tz, (1,))
                due = min(due, again)
        return due

    def __repr__(self) -> str:
        o = self._orig
        return (
            f"<crontab: {o['minute']} {o['hour']} {o['day_of_month']} {o['month_of_year']} "
            f"{o['day_of_week']} (m/h/dM/MY/d)>"
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, crontab):
            return (
                self.minute == other.minute
                and self.hour == other.hour
                and self.day_of_week == other.day_of_week
                and self.day_of_month == other.day_of_month
                and self.month_of_year == other.month_of_year
            )
        return NotImplemented

    def __hash__(self) -> int:
        return hash(
            (self.minute, self.hour, self.day_of_week, self.day_of_month, self.month_of_year)
        )

    def __reduce__(self) -> tuple[Any, ...]:
        o = self._orig
        return self.__class__, (
            o["minute"], o["hour"], o["day_of_week"], o["day_of_month"], o["month_of_year"],
        )


# -- solar ------------------------------------------------------------------------------

# event -> (which crossing, sun altitude in degrees). -0.833 allows for refraction and the
# sun's radius, as almanacs do for sunrise and sunset.
_SOLAR_EVENTS: dict[str, tuple[str, float]] = {
    "dawn_astronomical": ("rise", -18.0),
    "dawn_nautical": ("rise", -12.0),
    "dawn_civil": ("rise", -6.0),
    "sunrise": ("rise", -0.833),
    "solar_noon": ("noon", 0.0),
    "sunset": ("set", -0.833),
    "dusk_civil": ("set", -6.0),
    "dusk_nautical": ("set", -12.0),
    "dusk_astronomical": ("set", -18.0),
}
_J2000 = 2451545.0
_UNIX_JD = 2440587.5


class solar(BaseSchedule):  # Celery's lowercase name
    """At a solar event (``sunrise``, ``sunset``, ``dawn_civil``, ...) at a place.

    Uses the standard sunrise equation, good to about a minute at ordinary latitudes
    (Celery uses the ``ephem`` package). An event that does not happen on a given day
    (polar day or night) is skipped to the next day it does.
    """

    def __init__(
        self,
        event: str,
        lat: float,
        lon: float,
        nowfun: Callable[[], dt.datetime] | None = None,
        app: Any = None,
    ) -> None:
        super().__init__(nowfun, app)
        if event not in _SOLAR_EVENTS:
            raise ValueError(
                f'Argument event "{event}" is invalid; choose one of {", ".join(_SOLAR_EVENTS)}'
            )
        if not -90 <= lat <= 90:
            raise ValueError(f'Argument lat "{lat}" is invalid; it must be in -90..90')
        if not -180 <= lon <= 180:
            raise ValueError(f'Argument lon "{lon}" is invalid; it must be in -180..180')
        self.event, self.lat, self.lon = event, lat, lon

    def _event_jd(self, n: int) -> float | None:
        """Julian date of the event on solar day ``n`` (days since J2000), or None."""
        kind, altitude = _SOLAR_EVENTS[self.event]
        rad = math.radians
        mean = n - self.lon / 360.0
        anomaly = (357.5291 + 0.98560028 * mean) % 360.0
        m = rad(anomaly)
        centre = 1.9148 * math.sin(m) + 0.0200 * math.sin(2 * m) + 0.0003 * math.sin(3 * m)
        ecliptic = rad((anomaly + centre + 180.0 + 102.9372) % 360.0)
        transit = _J2000 + mean + 0.0053 * math.sin(m) - 0.0069 * math.sin(2 * ecliptic)
        if kind == "noon":
            return transit
        sin_decl = math.sin(ecliptic) * math.sin(rad(23.4397))
        cos_decl = math.cos(math.asin(sin_decl))
        lat = rad(max(-89.99, min(89.99, self.lat)))
        cos_hour = (math.sin(rad(altitude)) - math.sin(lat) * sin_decl) / (math.cos(lat) * cos_decl)
        if not -1.0 <= cos_hour <= 1.0:
            return None
        half = math.degrees(math.acos(cos_hour)) / 360.0
        return transit - half if kind == "rise" else transit + half

    def next_after(self, t: dt.datetime) -> dt.datetime:
        after = _utc(t, self.tz)
        jd = after.timestamp() / 86400.0 + _UNIX_JD
        first = math.floor(jd - _J2000) - 1
        for n in range(first, first + 400):
            event = self._event_jd(n)
            if event is None:
                continue
            due = dt.datetime.fromtimestamp(round((event - _UNIX_JD) * 86400.0), UTC)
            if due > after:
                return due
        raise ValueError(f"{self!r} does not happen within a year of {after.isoformat()}")

    def __repr__(self) -> str:
        return f"<solar: {self.event} at latitude {self.lat}, longitude: {self.lon}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, solar):
            return (self.event, self.lat, self.lon) == (other.event, other.lat, other.lon)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.event, self.lat, self.lon))

    def __reduce__(self) -> tuple[Any, ...]:
        return self.__class__, (self.event, self.lat, self.lon)


def maybe_schedule(value: Any, relative: bool = False, app: Any = None) -> Any:
    """Numbers and timedeltas become :class:`schedule`; schedule objects get ``app`` bound."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = dt.timedelta(seconds=value)
    if isinstance(value, dt.timedelta):
        return schedule(value, relative, app=app)
    if app is not None and isinstance(value, BaseSchedule):
        value.app = app
    elif app is not None and hasattr(value, "app"):
        with contextlib.suppress(AttributeError):
            value.app = app
    return value
