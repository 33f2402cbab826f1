"""The command-line reference (docs/reference/cli.md) is the commands' own: each flag's name, default and help
are declared once, in its argparse parser, and the page's tables are rendered from them
(``scripts/cli_reference.py``). The hand-written tables (the demo, ``sft_checkpoints``, and the retriever
guide's ``serve`` table) must name exactly their parser's flags."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI_PAGE = ROOT / "docs" / "reference" / "cli.md"
RETRIEVER_PAGE = ROOT / "docs" / "guides" / "retriever.md"


def _reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = _reference()
PAGE_TABLES = REFERENCE.page_tables(CLI_PAGE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("command", sorted(REFERENCE.parsers()))
def test_the_page_table_is_the_one_the_parser_renders(command):
    assert command in PAGE_TABLES, f"no ## `{command}` table in {CLI_PAGE.relative_to(ROOT)}"
    assert PAGE_TABLES[command] == REFERENCE.table(REFERENCE.parsers()[command]), (
        f"the {command} table of {CLI_PAGE.relative_to(ROOT)} is stale: run `python scripts/cli_reference.py --write`")


def test_write_replaces_a_stale_table_and_leaves_the_rest(tmp_path):
    page = tmp_path / "cli.md"
    text = CLI_PAGE.read_text(encoding="utf-8")
    stale = text.replace("| `--test-limit` |", "| `--test-limit-old` |", 1)
    assert stale != text
    page.write_text(stale, encoding="utf-8")
    assert REFERENCE.write(page) == ["ragr1-data rl"]
    assert page.read_text(encoding="utf-8") == text
    assert REFERENCE.write(page) == []


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


def _table_flags(table_text: str) -> set[str]:
    first_cells = [line.split("|")[1] for line in table_text.splitlines()
                   if line.startswith("|") and not line.startswith("|---")][1:]  # without the header row
    return {flag for cell in first_cells for flag in re.findall(r"--[a-z0-9-]+", cell)}


@pytest.mark.parametrize(("command", "module"), [("ragr1-verl-demo", "ragr1_verl.demo.cli"),
                                               ("python -m ragr1_verl.sft.checkpoints CHECKPOINT_DIR",
                                                "ragr1_verl.sft.checkpoints")])
def test_hand_written_tables_name_exactly_the_parsers_flags(command, module):
    parser = importlib.import_module(module).make_parser()
    assert command in PAGE_TABLES, f"no ## `{command}` table in {CLI_PAGE.relative_to(ROOT)}"
    assert _table_flags(PAGE_TABLES[command]) == _flags(parser)


def test_the_retriever_serve_table_names_exactly_the_serve_flags():
    from retriever_server.cli import make_parser

    [commands] = [a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands.choices["serve"]
    page = RETRIEVER_PAGE.read_text(encoding="utf-8")
    section = page.split("| `ragr1-retriever serve` flag | default | what |", 1)[1].split("\n\n", 1)[0]
    assert _table_flags("| flag | default | what |" + section) == _flags(serve)
