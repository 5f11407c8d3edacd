from rich.console import Console

from geomoe.server.progress import phase


def test_a_phase_shows_its_description_and_elapsed_time():
    console = Console(record=True, force_terminal=True, width=120)
    ran = []
    with phase("converting to 16 experts per layer", console):
        ran.append(True)
    text = console.export_text()
    assert ran == [True] and "converting to 16 experts per layer" in text and "0:00:0" in text
