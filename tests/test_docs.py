"""The README and the documentation site (docs/, mkdocs.yml) agree with each other and with CI: the README
stays short, its two commands are the ones the getting-started page gives and the one `.ci/run` runs,
every page is in the site's nav, and every link of the README reaches a page and heading that exist.
(`mkdocs build --strict` in `.ci/run` checks the links between the pages.)"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMAND = re.compile(r"```bash\n(python3 -m venv \.venv && [^\n]+)\n```")


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 200


def test_the_readme_opens_with_the_two_commands_of_the_getting_started_page():
    readme_commands = COMMAND.findall(README)
    assert len(readme_commands) == 2
    assert readme_commands[0].endswith("&& ragr1-verl-demo")
    assert readme_commands[1].endswith("&& python -m pytest -p no:cacheprovider")
    assert README.index(readme_commands[1]) < README.index("\n## ", README.index("## Quickstart") + 1)
    assert COMMAND.findall((DOCS / "getting-started.md").read_text(encoding="utf-8")) == readme_commands


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    marker = ci.index("# --- README command 2, verbatim ---")
    assert ci[marker + 1] == COMMAND.findall(README)[1]


def _nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav))
    assert set(nav) == {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}


def _slug(heading: str) -> str:
    """The anchor of a heading, as MkDocs' toc extension makes it (inline code marks dropped)."""
    text = unicodedata.normalize("NFKD", heading.replace("`", "")).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_slug(match) for match in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


README_LINKS = sorted(set(re.findall(r"\]\(((?!https?:)[^)]+)\)", README)))


@pytest.mark.parametrize("link", README_LINKS)
def test_the_readme_links_reach_a_file_and_heading(link):
    path, _, anchor = link.partition("#")
    target = ROOT / path
    assert target.is_file(), link
    if anchor:
        assert anchor in _anchors(target), link


def test_the_readme_links_into_the_docs():
    assert {link.partition("#")[0] for link in README_LINKS if link.startswith("docs/")} >= {
        "docs/getting-started.md", "docs/reference/cli.md", "docs/reference/configuration.md",
        "docs/reference/metrics.md"}
