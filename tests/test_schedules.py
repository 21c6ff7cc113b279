"""Schedules as pure logic: parsing, next-run computation, DST, Celery's is_due API."""

from __future__ import annotations

import datetime as dt
import itertools
import pickle
from zoneinfo import ZoneInfo

import pytest

from celeriac import Celery
from celeriac.schedules import (
    ParseException,
    crontab,
    crontab_parser,
    maybe_schedule,
    schedstate,
    schedule,
    solar,
)

UTC = dt.UTC
NY = ZoneInfo("America/New_York")


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)  # type: ignore[arg-type, misc]


@pytest.fixture
def app() -> Celery:
    return Celery("sched", set_as_current=False)


@pytest.fixture
def ny_app() -> Celery:
    return Celery("sched-ny", set_as_current=False, timezone="America/New_York")


def walk(s: crontab | schedule | solar, start: dt.datetime, n: int) -> list[dt.datetime]:
    out, t = [], start
    for _ in range(n):
        t = s.next_after(t)
        out.append(t)
    return out


# -- intervals ---------------------------------------------------------------------------


def test_maybe_schedule_converts_numbers_and_timedeltas(app: Celery) -> None:
    s = maybe_schedule(10, app=app)
    assert isinstance(s, schedule) and s.run_every == dt.timedelta(seconds=10)
    assert maybe_schedule(dt.timedelta(minutes=2), app=app).seconds == 120
    c = crontab()
    assert maybe_schedule(c, app=app) is c and c.app is app
    assert maybe_schedule(None) is None
    assert repr(schedule(10)) == "<freq: 10.00 seconds>"
    assert schedule(10) == schedule(dt.timedelta(seconds=10))


def test_interval_next_after_and_last_due(app: Celery) -> None:
    s = schedule(10, app=app)
    t0 = utc(2024, 1, 1, 0, 0, 0)
    assert s.next_after(t0) == utc(2024, 1, 1, 0, 0, 10)
    assert s.last_due(t0, t0 + dt.timedelta(seconds=9.9)) is None
    assert s.last_due(t0, t0 + dt.timedelta(seconds=35)) == utc(2024, 1, 1, 0, 0, 30)
    # the anchor is a grid every beat computes alike, whatever the moment it starts
    assert s.anchor(utc(2024, 1, 1, 0, 0, 7, 123)) == t0
    assert schedule(0.2, app=app).anchor(utc(2024, 1, 1, 0, 0, 0, 350_000)) == utc(
        2024, 1, 1, 0, 0, 0, 200_000
    )


def test_interval_is_due_follows_celery(app: Celery) -> None:
    now = utc(2024, 1, 1, 12, 0, 0)
    s = schedule(dt.timedelta(minutes=5), nowfun=lambda: now, app=app)
    assert s.is_due(now - dt.timedelta(minutes=6)) == schedstate(True, 300.0)
    state = s.is_due(now - dt.timedelta(minutes=2))
    assert state.is_due is False and state.next == pytest.approx(180.0)
    assert s.remaining_estimate(now - dt.timedelta(minutes=1)) == dt.timedelta(minutes=4)


def test_interval_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        schedule(0)
    with pytest.raises(TypeError):
        schedule("often")  # type: ignore[arg-type]


# -- crontab parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parser", "spec", "expected"),
    [
        (crontab_parser(60), "*/15", {0, 15, 30, 45}),
        (crontab_parser(60), "1-5", {1, 2, 3, 4, 5}),
        (crontab_parser(60), "1,2,30", {1, 2, 30}),
        (crontab_parser(60), "1-10/3", {1, 4, 7, 10}),
        (crontab_parser(60), "50/5", {50, 55}),
        (crontab_parser(24), "22-2", {22, 23, 0, 1, 2}),
        (crontab_parser(7), "mon-fri", {1, 2, 3, 4, 5}),
        (crontab_parser(7), "sun,sat", {0, 6}),
        (crontab_parser(7), "fri-mon", {5, 6, 0, 1}),
        (crontab_parser(7), "7", {0}),
        (crontab_parser(31, 1), "*/10", {1, 11, 21, 31}),
        (crontab_parser(12, 1), "jan,jul-aug", {1, 7, 8}),
    ],
)
def test_crontab_parser(parser: crontab_parser, spec: str, expected: set[int]) -> None:
    assert parser.parse(spec) == expected


def test_crontab_fields_accept_ints_and_sets() -> None:
    c = crontab(minute=0, hour={1, "3-4"}, day_of_week="Monday")
    assert c.minute == {0} and c.hour == {1, 3, 4} and c.day_of_week == {1}
    assert repr(crontab("*/15")) == "<crontab: */15 * * * * (m/h/dM/MY/d)>"
    assert crontab.from_string("0 4 1 * mon") == crontab(0, 4, "mon", 1, "*")
    assert pickle.loads(pickle.dumps(crontab("*/5", "9-17"))) == crontab("*/5", "9-17")


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"minute": "61"}, "minute", "61"),
        ({"hour": "24"}, "hour", "24"),
        ({"minute": "*/0"}, "minute", "*/0"),
        ({"day_of_week": "funday"}, "day_of_week", "funday"),
        ({"day_of_month": "0"}, "day_of_month", "0"),
        ({"month_of_year": "13"}, "month_of_year", "13"),
        ({"minute": "-5"}, "minute", "-5"),
        ({"hour": ""}, "hour", ""),
        ({"minute": 1.5}, "minute", "1.5"),
    ],
)
def test_bad_crontab_names_field_and_value(
    kwargs: dict[str, object], field: str, value: str
) -> None:
    with pytest.raises(ValueError) as info:
        crontab(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ParseException)
    assert f"{field}=" in str(info.value) and value in str(info.value)


def test_impossible_date_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"day_of_month='30'.*month_of_year='2'"):
        crontab(day_of_month=30, month_of_year=2)
    with pytest.raises(ValueError, match="5 fields"):
        crontab.from_string("* * *")


# -- crontab next runs -------------------------------------------------------------------


def test_crontab_next_after_simple(app: Celery) -> None:
    every15 = crontab(minute="*/15", app=app)
    assert walk(every15, utc(2024, 1, 1, 10, 7), 3) == [
        utc(2024, 1, 1, 10, 15), utc(2024, 1, 1, 10, 30), utc(2024, 1, 1, 10, 45),
    ]
    # exactly on a due time: the next one, not the same one
    assert every15.next_after(utc(2024, 1, 1, 10, 15)) == utc(2024, 1, 1, 10, 30)
    nightly = crontab(minute=30, hour=4, app=app)
    assert nightly.next_after(utc(2024, 1, 1, 4, 30, 0, 1)) == utc(2024, 1, 2, 4, 30)


def test_crontab_weekdays_months_and_leap_days(app: Celery) -> None:
    weekdays = crontab(minute=0, hour=9, day_of_week="mon-fri", app=app)
    # 2024-01-05 is a Friday: the next run after Friday 09:00 is Monday
    assert weekdays.next_after(utc(2024, 1, 5, 9, 0)) == utc(2024, 1, 8, 9, 0)
    quarterly = crontab(0, 0, day_of_month=1, month_of_year="*/3", app=app)
    assert walk(quarterly, utc(2024, 2, 10), 2) == [utc(2024, 4, 1), utc(2024, 7, 1)]
    leap = crontab(0, 0, day_of_month=29, month_of_year=2, app=app)
    assert leap.next_after(utc(2024, 3, 1)) == utc(2028, 2, 29)
    # day_of_month AND day_of_week, as in Celery: Friday the 13th
    friday13 = crontab(0, 0, day_of_week="fri", day_of_month=13, app=app)
    assert friday13.next_after(utc(2024, 1, 1)) == utc(2024, 9, 13)
    assert crontab(app=app).last_due(utc(2024, 1, 1), utc(2024, 1, 1, 0, 5, 30)) == utc(
        2024, 1, 1, 0, 5
    )


def test_crontab_last_due_over_a_long_gap(app: Celery) -> None:
    every_minute = crontab(app=app)
    assert every_minute.last_due(utc(2023, 1, 1), utc(2024, 1, 1, 0, 0, 30)) == utc(2024, 1, 1)
    weekly = crontab(0, 0, day_of_week="sun", app=app)
    assert weekly.last_due(utc(2024, 1, 8), utc(2024, 1, 13)) is None


def test_crontab_in_the_app_timezone(ny_app: Celery) -> None:
    c = crontab(minute=0, hour=9, app=ny_app)
    assert c.next_after(utc(2024, 1, 1)) == utc(2024, 1, 1, 14, 0)  # 09:00 EST
    assert c.next_after(utc(2024, 7, 1)) == utc(2024, 7, 1, 13, 0)  # 09:00 EDT


def test_dst_spring_forward_runs_skipped_time_once(ny_app: Celery) -> None:
    daily = crontab(minute=30, hour=2, app=ny_app)  # 02:30 does not exist on 2024-03-10
    runs = walk(daily, utc(2024, 3, 9, 12), 3)
    assert [r.astimezone(NY).strftime("%m-%d %H:%M") for r in runs] == [
        "03-10 03:30", "03-11 02:30", "03-12 02:30",
    ]
    half_hourly = walk(crontab(minute="*/30", app=ny_app), utc(2024, 3, 10, 5, 0), 6)
    gaps = {(b - a) for a, b in itertools.pairwise(half_hourly)}
    assert gaps == {dt.timedelta(minutes=30)}  # real time keeps flowing evenly


def test_dst_fall_back_fixed_time_once_wildcard_hour_twice(ny_app: Celery) -> None:
    daily = crontab(minute=30, hour=1, app=ny_app)  # 01:30 happens twice on 2024-11-03
    runs = walk(daily, utc(2024, 11, 2, 12), 2)
    assert runs == [utc(2024, 11, 3, 5, 30), utc(2024, 11, 4, 6, 30)]
    hourly = walk(crontab(minute=30, app=ny_app), utc(2024, 11, 3, 4, 0), 4)
    assert hourly == [utc(2024, 11, 3, h, 30) for h in (4, 5, 6, 7)]  # 00:30, 01:30 x2, 02:30
    assert len(set(hourly)) == len(hourly)


def test_crontab_is_due(app: Celery) -> None:
    now = utc(2024, 1, 1, 10, 0, 5)
    hourly = crontab(minute=0, nowfun=lambda: now, app=app)
    due, nxt = hourly.is_due(utc(2024, 1, 1, 9, 0))
    assert due and nxt == pytest.approx(3595.0)
    due, nxt = hourly.is_due(utc(2024, 1, 1, 10, 0))
    assert not due and nxt == pytest.approx(3595.0)


# -- solar -------------------------------------------------------------------------------


def test_solar_london_midsummer(app: Celery) -> None:
    """Almanac values for London on 2024-06-21: sunrise 03:43, noon 12:02, sunset 20:21 UTC."""
    start = utc(2024, 6, 21)
    expected = {"sunrise": (3, 43), "solar_noon": (12, 2), "sunset": (20, 21)}
    for event, (hour, minute) in expected.items():
        got = solar(event, 51.5074, -0.1278, app=app).next_after(start)
        assert abs((got - utc(2024, 6, 21, hour, minute)).total_seconds()) < 180, event


def test_solar_polar_day_skips_to_next_occurrence(app: Celery) -> None:
    got = solar("sunset", 80.0, 0.0, app=app).next_after(utc(2024, 6, 21))
    assert utc(2024, 8, 1) < got < utc(2024, 9, 30)


def test_solar_validation() -> None:
    with pytest.raises(ValueError, match="event"):
        solar("moonrise", 0, 0)
    with pytest.raises(ValueError, match="lat"):
        solar("sunrise", 91, 0)
    with pytest.raises(ValueError, match="lon"):
        solar("sunrise", 0, 181)
