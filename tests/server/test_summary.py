from rich.console import Console

from geomoe.server.federation import summary_table


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
