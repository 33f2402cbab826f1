"""The README's command-line reference tables, rendered from the commands' own argparse parsers.

``python scripts/cli_reference.py`` prints every table; paste a changed one into the README's
"Command-line reference". ``tests/test_readme_cli.py`` fails when a table and its parser disagree, so a
flag's name, default and help are declared once, in the parser.
"""

from __future__ import annotations

import argparse
import sys


def parsers() -> dict[str, argparse.ArgumentParser]:
    """The README heading of each table -> its parser."""
    from ragr1_verl.data.cli import build_parser as data_parser
    from ragr1_verl.evaluation.cli import build_parser as eval_parser

    data = data_parser()
    [subcommands] = [a for a in data._actions if isinstance(a, argparse._SubParsersAction)]
    tables = {f"ragr1-data {name}": sub for name, sub in subcommands.choices.items()}
    tables["ragr1-eval"] = eval_parser()
    return tables


def default_text(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if action.default is None:
        if (action.help or "").startswith("(protocol)"):
            return "(protocol)"
        return "(see meaning)" if "default" in (action.help or "") else "none"
    if isinstance(action.default, list | tuple):
        return " ".join(str(item) for item in action.default)
    return str(action.default)


def rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str]]:
    """(option, default, meaning) for each option, in the parser's order (help and suppressed ones left out)."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        name = max(action.option_strings, key=len)
        out.append((name, default_text(action), (action.help or "").replace("|", "\\|")))
    return out


def table(parser: argparse.ArgumentParser) -> str:
    lines = ["| option | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {default} | {meaning} |" for name, default, meaning in rows(parser)]
    return "\n".join(lines)


def main() -> int:
    for heading, parser in parsers().items():
        sys.stdout.write(f"**`{heading}`**\n\n{table(parser)}\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
