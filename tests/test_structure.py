"""The package's folders read as the data path: each imports only from the layers below it, no cycles, and the
README's diagram lists the same folders in the same layers."""

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A package may import packages of lower layers only (and its own modules).
LAYERS = [
    ["protos"],
    ["model", "data"],
    ["world"],
    ["wire"],
    ["expert_parallel"],
    ["server", "client", "camera", "deploy"],
    ["sim", "prune"],
    ["analysis"],
    ["bench"],
    ["cli"],
]
LAYER_OF = {package: k for k, layer in enumerate(LAYERS) for package in layer}
CLI_MODULE_LINES = 200
MODULE_LINES = 300  # longer modules say why in their docstring ("Longer than 300 lines because ...")


def folders() -> dict[str, Path]:
    """geomoe subpackage name -> its folder, as pyproject.toml installs them."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name.split(".")[1]: ROOT / folder for name, folder in package_dir.items() if name != "geomoe"}


def imported_packages(path: Path) -> set[str]:
    """geomoe subpackages a module imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name.split(".")[1] for name in names if name.startswith("geomoe.") and name.count(".") >= 1)
    return found


def package_imports() -> dict[str, set[str]]:
    graph = {}
    for package, folder in folders().items():
        modules = [p for p in folder.rglob("*.py") if "_pb2" not in p.name]
        graph[package] = {imported for m in modules for imported in imported_packages(m)} - {package}
    return graph


def test_every_package_has_a_layer_and_the_root_package_holds_no_code():
    assert set(folders()) == set(LAYER_OF)
    assert [p.name for p in (ROOT / "geomoe").glob("*.py")] == ["__init__.py"]


def test_packages_import_only_from_lower_layers():
    graph = package_imports()
    upward = sorted(
        f"{package} -> {imported}"
        for package, imports in graph.items()
        for imported in imports
        if imported in LAYER_OF and LAYER_OF[imported] >= LAYER_OF[package]
    )
    assert not upward, f"imports against the layering: {upward}"


def test_the_package_graph_has_no_cycle():
    graph = package_imports()
    visiting, done = set(), set()

    def visit(package: str, path: list[str]) -> None:
        assert package not in visiting, f"import cycle: {' -> '.join([*path, package])}"
        if package in done:
            return
        visiting.add(package)
        for imported in graph.get(package, ()):
            visit(imported, [*path, package])
        visiting.discard(package)
        done.add(package)

    for package in graph:
        visit(package, [])


def test_the_readme_diagram_shows_the_folders_in_their_layers():
    readme = (ROOT / "README.md").read_text()
    diagram = readme.split("<!-- layers -->")[1].split("```")[1]
    rows = [re.findall(r"\b([a-z_]+)/", line) for line in diagram.splitlines()]
    shown = [row for row in rows if row]
    assert list(reversed(shown)) == LAYERS  # the diagram reads top (CLI) to bottom (protos)


def test_a_module_over_300_lines_says_why_in_its_docstring():
    unexplained = []
    for folder in folders().values():
        for path in folder.rglob("*.py"):
            if "_pb2" in path.name or len(path.read_text().splitlines()) <= MODULE_LINES:
                continue
            docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
            if f"Longer than {MODULE_LINES} lines because" not in " ".join(docstring.split()):
                unexplained.append(str(path.relative_to(ROOT)))
    assert not unexplained, f"over {MODULE_LINES} lines with no reason in the docstring: {unexplained}"


def test_cli_modules_are_thin():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "cli").glob("*.py")}
    assert max(sizes.values()) <= CLI_MODULE_LINES, sizes


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.runtime"])
def test_the_device_images_copy_every_package_folder(dockerfile):
    wanted = {folder.name for folder in folders().values()} | {"geomoe"}
    text = (ROOT / "deploy" / dockerfile).read_text()
    assert set(re.findall(r"^COPY (\w+) \1$", text, flags=re.MULTILINE)) == wanted
    let_in = set(re.findall(r"^!(\w+)$", (ROOT / ".dockerignore").read_text(), flags=re.MULTILINE))
    assert wanted <= let_in
