"""The README's command-line reference is the commands' own: each flag's name, default and help are declared
once, in its argparse parser, and the README's tables are rendered from them (``scripts/cli_reference.py``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TABLE = re.compile(r"\*\*`([^`]+)`\*\*\n\n(\| option \| default \| meaning \|\n(?:\|.*\n)+)")


def _reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = _reference()
README_TABLES = {match.group(1): match.group(2).rstrip("\n") for match in TABLE.finditer(README)}


@pytest.mark.parametrize("command", sorted(REFERENCE.parsers()))
def test_the_readme_table_is_the_one_the_parser_renders(command):
    assert command in README_TABLES, f"no **`{command}`** table in the README's command-line reference"
    assert README_TABLES[command] == REFERENCE.table(REFERENCE.parsers()[command]), (
        f"the README's {command} table is stale: paste it from `python scripts/cli_reference.py`")


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


def _readme_flags(table_text: str) -> set[str]:
    first_cells = [line.split("|")[1] for line in table_text.splitlines()
                   if line.startswith("|") and not line.startswith("|---")][1:]  # without the header row
    return {flag for cell in first_cells for flag in re.findall(r"--[a-z0-9-]+", cell)}


@pytest.mark.parametrize(("command", "module"), [("ragr1-verl-demo", "ragr1_verl.cpu.demo"),
                                               ("python -m ragr1_verl.sft_checkpoints CHECKPOINT_DIR",
                                                "ragr1_verl.sft_checkpoints")])
def test_hand_written_tables_name_exactly_the_parsers_flags(command, module):
    parser = importlib.import_module(module).make_parser()
    assert _readme_flags(README_TABLES[command]) == _flags(parser)


def test_the_retriever_serve_table_names_exactly_the_serve_flags():
    from retriever_server.cli import make_parser

    [commands] = [a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands.choices["serve"]
    section = README.split("| `ragr1-retriever serve` flag | default | what |", 1)[1].split("\n\n", 1)[0]
    assert _readme_flags("| flag | default | what |" + section) == _flags(serve)
