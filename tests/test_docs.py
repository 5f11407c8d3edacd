"""The documentation site builds strictly: a broken link, a missing page or a page left out of the nav fails."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from geomoe.wire.config_reference import reference_markdown
from geomoe.wire.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def build(project: Path, site: Path) -> subprocess.CompletedProcess:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed (the dev extra brings it)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [str(mkdocs), "build", "--strict", "-f", str(project / "mkdocs.yml"), "-d", str(site)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def copy_of_the_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    for part in ("docs", "scripts"):
        shutil.copytree(ROOT / part, project / part)
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    return project


def test_the_site_builds_strictly_with_every_generated_page(tmp_path):
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index.html", "configuration/index.html", "benchmarks/index.html", "security/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


@pytest.mark.parametrize(
    "breakage",
    ["a link to a page that is not there", "a page missing from the nav"],
)
def test_a_broken_link_or_a_page_left_out_fails_the_build(tmp_path, breakage):
    project = copy_of_the_project(tmp_path)
    if breakage.startswith("a link"):
        with (project / "docs" / "tests.md").open("a") as page:
            page.write("\nSee [the old guide](old-guide.md).\n")
    else:
        (project / "docs" / "stray.md").write_text("# Stray\n")
    result = build(project, tmp_path / "site")
    assert result.returncode != 0
    assert ("old-guide.md" if breakage.startswith("a link") else "stray.md") in result.stdout + result.stderr


def test_the_configuration_reference_lists_every_key_with_its_comment():
    page = reference_markdown()
    cfg = RunConfig()
    for section in ("world", "model", "conversion", "train", "federation", "privacy"):
        for key in vars(getattr(cfg, section)):
            assert f"`{section}.{key}`" in page, f"{section}.{key}"
    assert "| `federation.rounds` | `int` |" in page and "| `seed` | `int` | `0` |" in page


def guide_commands() -> list[tuple[str, list[str]]]:
    """Every `geomoe ...` command in the guides' and README's code blocks, as (page, arguments)."""
    import re
    import shlex

    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), flags=re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                for start, word in enumerate(words):
                    if word in ("geomoe", ".venv/bin/geomoe"):
                        found.append((page.name, words[start + 1 :]))
                        break
    return found


def test_every_command_in_the_guides_names_a_real_command_option_and_setting():
    """A renamed command, option or setting fails here, not in a user's shell."""
    import click
    import typer

    from geomoe.cli.main import app
    from geomoe.wire.run_config import set_override

    commands = guide_commands()
    assert len(commands) > 30
    root = typer.main.get_command(app)
    for page, words in commands:
        command, rest = root, list(words)
        while isinstance(command, click.Group) and rest and rest[0] in command.commands:
            command = command.commands[rest.pop(0)]
        assert not isinstance(command, click.Group), f"{page}: geomoe {' '.join(words)}: no such command"
        options = {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
        cfg = RunConfig()
        for k, word in enumerate(rest):
            name = word.split("=", 1)[0]
            if name.startswith("--"):
                assert name in options, f"{page}: geomoe {' '.join(words)}: {name} is not an option of it"
            if name == "--set":
                key, _, value = rest[k + 1].partition("=")
                cfg = set_override(cfg, key, value)  # raises naming an unknown or mistyped setting
