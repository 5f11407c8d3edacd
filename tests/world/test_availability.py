"""When simulated nodes are online: daily windows in local solar time, duty cycles, traces, shares; and the
simulated clock's trips (downloads and uploads that fit a window, training time, store-and-forward after expiry)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geomoe.world.availability import DAY_S, HOUR_S, Availability
from geomoe.world.clock import FieldClock
from geomoe.world.config import WorldConfig
from geomoe.world.links import LinkProfile


def test_always_is_online_now_and_forever():
    assert Availability("always").window("a", 0.0, 123.0) == (123.0, math.inf)


def test_daily_windows_follow_local_solar_time():
    availability = Availability("daily:6-6.5,18-18.5")
    assert availability.window("a", 0.0, 0.0) == (6 * HOUR_S, 6.5 * HOUR_S)
    assert availability.online("a", 0.0, 6.25 * HOUR_S)
    assert availability.window("a", 0.0, 7 * HOUR_S) == (18 * HOUR_S, 18.5 * HOUR_S)
    assert availability.window("a", 0.0, 19 * HOUR_S) == (DAY_S + 6 * HOUR_S, DAY_S + 6.5 * HOUR_S)
    # 90 degrees east: local 06:00 is 00:00 UTC
    assert availability.window("a", 90.0, 0.0) == (0.0, 0.5 * HOUR_S)


def test_a_window_past_midnight_is_one_stretch():
    start, end = Availability("daily:22-02:00").window("a", 0.0, 12 * HOUR_S)
    assert (start, end) == (22 * HOUR_S, DAY_S + 2 * HOUR_S)


def test_share_keeps_the_other_nodes_always_online():
    availability = Availability("daily:6-7", share=0.5, seed=3)
    names = [f"n{i}" for i in range(200)]
    following = sum(availability.follows(name) for name in names)
    assert 60 < following < 140  # a seeded draw per node: the same nodes in every run
    assert following == sum(Availability("daily:6-7", share=0.5, seed=3).follows(name) for name in names)
    assert not any(Availability("daily:6-7", share=0.0).follows(name) for name in names)


def test_duty_cycle_is_whole_hours_drawn_from_the_seed():
    availability = Availability("duty:0.1", seed=1)
    start, end = availability.window("n", 0.0, 0.0)
    assert start % HOUR_S == 0 and end % HOUR_S == 0 and end > start
    assert availability.window("n", 0.0, 0.0) == Availability("duty:0.1", seed=1).window("n", 0.0, 0.0)


def test_a_trace_lists_intervals_and_leaves_unlisted_nodes_online(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("node,start_s,end_s\na,100,200\na,200,300\na,1000,1100\n")
    availability = Availability(str(trace))
    assert availability.window("a", 0.0, 0.0) == (100.0, 300.0)  # rows that meet are one stretch
    assert availability.window("a", 0.0, 400.0) == (1000.0, 1100.0)
    assert availability.window("a", 0.0, 2000.0) is None
    assert availability.window("b", 0.0, 5.0) == (5.0, math.inf)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("daily:25-26", "not within 0..24"),
        ("daily:6", "is not HH-HH"),
        ("daily:6-6", "is empty"),
        ("duty:2", "P must lie in (0, 1]"),
        ("duty:x", "P must be a number"),
        ("sometimes", "use always, daily"),
    ],
)
def test_bad_specs_name_the_setting(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Availability(spec)


def test_bad_trace_rows_name_the_file_and_line(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("node,start_s,end_s\na,5,1\n")
    with pytest.raises(ValueError, match=r"t\.csv:2: need 0 <= start_s < end_s"):
        Availability(str(trace))
    trace.write_text("who,when\n")
    with pytest.raises(ValueError, match="header must name node,start_s,end_s"):
        Availability(str(trace))


def test_world_config_refuses_a_bad_field_and_keeps_the_world_key():
    with pytest.raises(ValueError, match="world.link"):
        WorldConfig(link="pigeon")
    with pytest.raises(ValueError, match="world.device_speed"):
        WorldConfig(device_speed=0)
    assert WorldConfig(availability="duty:0.5", device_speed=8).key() == WorldConfig().key()  # the same data


LINK = LinkProfile("test", 8_000, 0.0, 0, 0.0)  # 1000 bytes a second


def clock(spec: str, speed: float = 1.0) -> FieldClock:
    return FieldClock(Availability(spec), LINK, speed, seconds_per_example=0.5)


def test_a_message_waits_for_a_window_long_enough_to_carry_it():
    field = clock("daily:0-0.01,6-7")  # 36 s, then an hour
    assert field.carried("a", 0.0, 0.0, 10_000) == 10.0  # 10 s fits the first window
    assert field.carried("a", 0.0, 0.0, 100_000) == 6 * HOUR_S + 100  # 100 s does not: the next one


def test_a_trip_downloads_trains_and_uploads_in_windows():
    field = clock("daily:6-7", speed=4.0)
    trip = field.trip("a", 0.0, 0.0, down_bytes=1000, up_bytes=2000, examples=100, ttl_s=DAY_S)
    assert trip.downloaded_at == 6 * HOUR_S + 1
    assert trip.trained_at == trip.downloaded_at + 100 * 0.5 * 4
    assert trip.arrived_at == trip.trained_at + 2 and trip.resends == 0


def test_a_reply_past_its_message_ttl_goes_out_with_the_next_message():
    field = clock("daily:6-6.1")  # 6 minutes a day
    trip = field.trip("a", 0.0, 0.0, down_bytes=1000, up_bytes=1000, examples=2000, ttl_s=12 * HOUR_S)
    # trained for 1000 s after the download, past the window: the reply waits a day, the message expired first
    assert trip.resends >= 1
    assert trip.arrived_at == DAY_S + 6 * HOUR_S + 2  # the new message's download, then the kept update


def test_a_node_whose_windows_never_fit_the_message_never_answers():
    trip = clock("daily:6-6.001").trip("a", 0.0, 0.0, 100_000, 10, 1, ttl_s=DAY_S)
    assert trip.arrived_at is None


@given(t=st.floats(0, 30 * DAY_S), lon=st.floats(-180, 180))
def test_a_window_never_starts_before_the_time_asked(t, lon):
    start, end = Availability("daily:6-6.5,18-19").window("a", lon, t)
    assert t <= start < end
