"""`geomoe bench links` summarised from hand-built reports: curves in simulated hours and bytes, the target and
when each run reached it, the week's accuracy, refusals, wasted node-hours and updates fitted to a link budget."""

from geomoe.bench.links import TRACES, curve, plateau, reached, summarise
from geomoe.wire.run_config import RunConfig


def report(mode: str, points: list[tuple[float, float]], wasted: float = 0.0, stale: int = 0) -> dict:
    """A run whose evaluation after round r (1-based) scored points[r-1] = (sim hours, accuracy); 1 kB a round."""
    traffic = {"a": {"down": 600, "up": 400}}
    rows = [{"round": r, "sim_hours": h, "replies": 2, "traffic": traffic, "wasted_node_hours": wasted,
             "link": {"compressed": 2, "deferred": r - 1}} for r, (h, _) in enumerate(points, start=1)]  # fmt: skip
    evaluations = {"0": {"server_accuracy": 0.1, "sim_hours": 0.0}}
    for r, (h, accuracy) in enumerate(points, start=1):
        evaluations[str(r)] = {"server_accuracy": accuracy} | ({"sim_hours": h} if mode == "async" else {})
    return {
        "rounds": rows,
        "evaluations": evaluations,
        "setup": {"traffic": {"0": {"a": {"down": 5000, "up": 0}}}},
        "locations": [{"cell": "a"}, {"cell": "b"}],
        "refused": {"stale": stale} if mode == "async" else {},
        "privacy": {"stopped": ""},
    }


def test_a_curve_counts_setup_and_every_round_up_to_each_evaluation():
    points = curve(report("sync", [(1.0, 0.3), (2.0, 0.5)]))
    assert [(p["sim_hours"], p["bytes"], p["server_accuracy"]) for p in points] == [
        (0.0, 5000, 0.1), (1.0, 6000, 0.3), (2.0, 7000, 0.5)
    ]  # fmt: skip


def test_runs_are_judged_against_sync_always_on_settled_and_reach_it_when_they_stay_there():
    reports = {}
    for trace in TRACES:
        reports[("sync", trace)] = report("sync", [(1.0, 0.3), (2.0, 0.5), (3.0, 0.6), (4.0, 0.5), (5.0, 0.5)], 0.5)
        noisy_then_settled = [(0.5, 0.6), (1.0, 0.2), (1.5, 0.6), (2.0, 0.6), (3.0, 0.6), (200.0, 0.7)]
        reports[("async", trace)] = report("async", noisy_then_settled, stale=2)
    result = summarise(reports, RunConfig())
    assert result["target_accuracy"] == 0.5 and result["nodes"] == 2  # the mean of sync-always's last third
    fast = result["runs"]["async-windows"]
    assert fast["hours_to_target"] == 3.0 and fast["bytes_to_target"] == 10_000  # not the lucky 0.6 at 0.5 h
    assert fast["accuracy_after_a_week"] == 0.6  # the 200-hour evaluation is past a week
    assert fast["refused_stale"] == 2 and result["runs"]["sync-lora"]["wasted_node_hours"] == 2.5
    assert (fast["link_compressed"], fast["link_deferred"]) == (12, 15)


def test_a_run_that_never_settles_at_the_target_has_no_hours_to_it():
    assert reached([{"server_accuracy": a} for a in (0.9, 0.1, 0.7, 0.1)], 0.6) is None
    assert plateau([{"server_accuracy": 0.4}]) == 0.4
