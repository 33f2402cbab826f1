"""Settings declared once: the flags of the command lines take their default and help from the field they
set, and an old flag name still works and warns."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from ragr1_verl.config import RagR1Config
from ragr1_verl.data.cli import build_parser as data_parser
from ragr1_verl.evaluation.cli import build_parser as eval_parser
from ragr1_verl.settings import add_setting_argument, documented, setting, setting_help


@dataclasses.dataclass(frozen=True)
class Example:
    budget: int = setting(7, paper=9, help="tokens kept")
    name: str = setting("x", help="a name", key="label")
    nested: dict = dataclasses.field(default_factory=dict)  # no help: not a documented setting


def test_a_setting_documents_its_default_the_papers_value_and_its_key():
    rows = documented(Example, "example.")
    assert [(row.key, row.default, row.paper, row.help) for row in rows] == [
        ("example.budget", "7", "9", "tokens kept"), ("example.label", "x", "none", "a name")]


def test_a_flag_takes_default_and_help_from_its_field_and_an_old_name_warns():
    parser = argparse.ArgumentParser()
    add_setting_argument(parser, Example, "budget", type=int, deprecated=("--old-budget",), help_suffix="(here)")
    assert parser.parse_args([]).budget == 7
    assert parser.parse_args(["--budget", "3"]).budget == 3
    with pytest.warns(FutureWarning, match="--old-budget is deprecated .* use --budget"):
        assert parser.parse_args(["--old-budget", "4"]).budget == 4
    assert "tokens kept (here)" in parser.format_help() and "--old-budget" not in parser.format_help()


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    [action] = [action for action in parser._actions if action.dest == dest and action.help != argparse.SUPPRESS]
    return action


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    [subcommands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subcommands.choices[name]


@pytest.mark.parametrize("name", ["topk", "mode", "max_turns", "max_queries_per_search", "max_obs_tokens_per_query",
                                  "observation_format"])
def test_ragr1_data_sft_generate_sets_the_ragr1_keys_under_their_own_names(name):
    parser = _subcommand(data_parser(), "sft-generate")
    action = _action(parser, name)
    assert action.option_strings == ["--" + name.replace("_", "-")]
    assert setting_help(RagR1Config, name) in action.help
    assert action.default == getattr(RagR1Config(), name)


@pytest.mark.parametrize("old, new, value", [("--max-obs-tokens", "max_obs_tokens_per_query", "224"),
                                             ("--max-queries", "max_queries_per_search", "2")])
def test_the_old_sft_generate_flags_still_work_and_warn(old, new, value):
    parser = _subcommand(data_parser(), "sft-generate")
    with pytest.warns(FutureWarning, match=f"{old} is deprecated"):
        args = parser.parse_args(["--source", "demo", "--out", "x", old, value])
    assert getattr(args, new) == int(value)


def test_ragr1_eval_takes_the_protocol_keys_help_from_the_fields():
    parser = eval_parser()
    for name in ("topk", "mode", "max_turns", "max_obs_tokens_per_query", "max_tokens_per_turn"):
        assert setting_help(RagR1Config, name) in _action(parser, name).help, name
    assert _action(parser, "topk").default == RagR1Config().topk
    assert _action(parser, "max_turns").default is None  # the evaluation protocol decides
