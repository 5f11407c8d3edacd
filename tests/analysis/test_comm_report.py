"""Communication cost read from finished runs' reports."""

from geomoe.analysis.comm_report import accuracy_at_budget, accuracy_by_upload, compare_strategies


def report(uploads: list[int], accuracies: list[float]) -> dict:
    rounds = [
        {"round": r + 1, "traffic": {"0/": {"up": up, "down": 0}, "4/": {"up": up, "down": 0}}}
        for r, up in enumerate(uploads)
    ]
    return {
        "rounds": rounds,
        "evaluations": {str(r): {"accuracy": a} for r, a in enumerate(accuracies)},
        "final_accuracy": accuracies[-1],
    }


def test_accuracy_by_cumulative_upload():
    assert accuracy_by_upload(report([10, 10], [0.1, 0.5, 0.6])) == [(0.0, 0.1), (10.0, 0.5), (20.0, 0.6)]
    assert accuracy_at_budget([(0.0, 0.1), (10.0, 0.5), (20.0, 0.6)], 15) == 0.5


def test_comparison_at_equal_upload():
    result = compare_strategies(
        {"fedavg": report([100, 100], [0.1, 0.4, 0.5]), "expert": report([5] * 4, [0.1, 0.3, 0.45, 0.5, 0.55])}
    )
    assert result["upload_ratio_to_fedavg"] == {"fedavg": 1.0, "expert": 0.05}
    assert result["equal_upload_budget_bytes"] == 100
    assert result["accuracy_at_equal_upload"] == {"fedavg": 0.4, "expert": 0.55}
