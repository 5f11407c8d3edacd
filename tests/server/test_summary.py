import numpy as np
from rich.console import Console

from geomoe.server.federation import evaluation_sample, summary_table
from geomoe.wire.run_config import RunConfig
from geomoe.world.world import World


def report(unknown: list[int]) -> dict:
    rounds = [
        {
            "round": r + 1,
            "traffic": {"0/": {"up": 1000, "down": 2000}},
            "experts_held": {"0/": 12},
            "unknown_species_images": n,
            "skipped_images": 0,
        }
        for r, n in enumerate(unknown)
    ]
    evaluations = {str(r): {"accuracy": 0.5, "server_accuracy": 0.4} for r in range(len(unknown) + 1)}
    return {"strategy": "expert", "rounds": rounds, "evaluations": evaluations}


def rendered(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_the_round_table_shows_images_of_unknown_species_only_when_there_are_some():
    text = rendered(summary_table(report([7, 7])))
    assert "unknown sp. imgs" in text and "unreadable imgs" not in text
    assert [line.split("│")[-2].strip() for line in text.splitlines() if line.startswith("│     1")] == ["7"]
    assert "unknown sp." not in rendered(summary_table(report([0, 0])))


def test_the_server_scores_every_round_on_the_same_capped_sample_of_test_images():
    world = World(RunConfig().world)
    everything = np.concatenate([location.test for location in world.locations])
    assert np.array_equal(evaluation_sample(world, 0, seed=0), everything)
    sample = evaluation_sample(world, 50, seed=0)
    assert len(sample) == 50 and set(sample) <= set(everything) and len(set(sample)) == 50
    assert np.array_equal(sample, evaluation_sample(world, 50, seed=0))
    assert np.array_equal(evaluation_sample(world, 10**6, seed=0), everything)
