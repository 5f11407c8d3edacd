"""Link profiles with a byte budget per online window: how they are written, and how the simulated clock carries an
upload over one (a piece per window) while downloads and always-online nodes are not counted in windows."""

import math

import pytest

from geomoe.world.availability import DAY_S, HOUR_S, Availability
from geomoe.world.clock import FieldClock
from geomoe.world.config import WorldConfig
from geomoe.world.links import LINKS, LinkProfile, parse_link


@pytest.mark.parametrize(("text", "budget"), [("lora@10000", 10_000), ("lora@10kB", 10_000), ("lora@1.5MB", 1_500_000),
                                              ("lora@250B", 250), ("lora", None)])  # fmt: skip
def test_a_budget_follows_the_profile_after_an_at(text, budget):
    link = parse_link(text)
    assert link.budget_bytes == budget
    assert link.bandwidth_bps == LINKS["lora"].bandwidth_bps


def test_a_custom_profile_takes_a_budget_too():
    assert parse_link("sat:2400:1.5:50@2kB") == LinkProfile("sat", 2400, 1.5, 50, 0.0, 2000)


@pytest.mark.parametrize("budget", ["ten", "0", "-5kB", "nan", "inf", ""])
def test_a_bad_budget_names_itself_and_the_setting(budget):
    with pytest.raises(ValueError, match="world.link: .*budget"):
        WorldConfig(link=f"lora@{budget}")


BUDGETED = LinkProfile("test", 8_000, 0.0, 0, 0.0, budget_bytes=3_000)  # 1000 bytes a second, 3000 a window


def clock(spec: str) -> FieldClock:
    return FieldClock(Availability(spec), BUDGETED, 1.0, seconds_per_example=0.5)


def test_an_upload_over_its_budget_goes_a_budget_per_window():
    field = clock("daily:6-7")
    assert field.carried("a", 0.0, 0.0, 2_000, upload=True) == 6 * HOUR_S + 2  # fits one window
    # 7000 bytes: 3000 today, 3000 tomorrow, the last 1000 the day after
    assert field.carried("a", 0.0, 0.0, 7_000, upload=True) == 2 * DAY_S + 6 * HOUR_S + 1


def test_a_window_too_short_for_the_budget_carries_what_its_length_allows():
    field = clock("daily:6-6.0005")  # 1.8 s: 1800 bytes a window
    assert field.carried("a", 0.0, 0.0, 3_000, upload=True) == DAY_S + 6 * HOUR_S + 1.2


def test_downloads_and_always_online_nodes_are_not_counted_in_windows():
    assert clock("daily:6-7").carried("a", 0.0, 0.0, 7_000) == 6 * HOUR_S + 7  # a download goes whole
    assert clock("always").carried("a", 0.0, 100.0, 7_000, upload=True) == 107.0


def test_a_trip_over_a_budgeted_link_arrives_when_its_last_piece_does():
    trip = clock("daily:6-7").trip("a", 0.0, 0.0, down_bytes=1000, up_bytes=4_000, examples=2, ttl_s=math.inf)
    assert trip.trained_at == 6 * HOUR_S + 2
    assert trip.arrived_at == DAY_S + 6 * HOUR_S + 1  # 3000 bytes in the first window, 1000 the next day
