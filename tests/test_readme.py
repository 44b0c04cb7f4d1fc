"""The README's first commands are the ones the Makefile defines, so they cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _first_section(readme: str) -> str:
    """Text from the top of the README up to its second level-two heading."""
    headings = [match.start() for match in re.finditer(r"^## ", readme, flags=re.MULTILINE)]
    return readme[: headings[1]] if len(headings) > 1 else readme


def _makefile_targets() -> set[str]:
    """Names of the targets the Makefile defines."""
    text = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.MULTILINE))


def test_first_section_shows_the_two_commands_and_the_makefile_defines_them() -> None:
    first = _first_section((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    commands = re.findall(r"^\s*make ([\w-]+)\s*$", first, flags=re.MULTILINE)
    assert commands[:2] == ["demo", "test"], commands
    assert set(commands) <= _makefile_targets()


def test_every_make_command_in_the_readme_exists() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    mentioned = set(re.findall(r"`make ([\w-]+)`|^\s*make ([\w-]+)", readme, flags=re.MULTILINE))
    names = {name for pair in mentioned for name in pair if name}
    missing = names - _makefile_targets()
    assert not missing, f"README mentions make targets the Makefile lacks: {sorted(missing)}"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)


def test_the_module_table_names_every_module() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([\w.]+\.py)` \|", readme, flags=re.MULTILINE))
    modules = {path.name for path in REPO_ROOT.glob("*.py")}
    assert modules <= listed, f"README's module table lacks {sorted(modules - listed)}"
