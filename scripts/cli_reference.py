"""The command-line reference tables of docs/reference/cli.md, rendered from the commands' own argparse parsers.

``python scripts/cli_reference.py`` prints every table under its heading; ``--write`` replaces each table in
``docs/reference/cli.md`` with the one its parser renders. ``tests/test_readme_cli.py`` fails when a table and
its parser disagree, so a flag's name, default and help are declared once, in the parser.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "cli.md"
HEADER = "| option | default | meaning |"
# a table of the page: its heading line, a blank line, then the header row and every row that follows
TABLE = re.compile(r"^## `([^`]+)`\n\n(" + re.escape(HEADER) + r"\n(?:\|.*\n?)+)", re.MULTILINE)


def parsers() -> dict[str, argparse.ArgumentParser]:
    """The page's heading of each table -> its parser."""
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
    lines = [HEADER, "|---|---|---|"]
    lines += [f"| `{name}` | {default} | {meaning} |" for name, default, meaning in rows(parser)]
    return "\n".join(lines)


def page_tables(text: str) -> dict[str, str]:
    """The page's heading -> its table's text (without the final newline), for every option table."""
    return {match.group(1): match.group(2).rstrip("\n") for match in TABLE.finditer(text)}


def write(page: Path = PAGE) -> list[str]:
    """Replace each rendered table in ``page`` with its parser's; returns the headings whose table changed.
    A heading missing from the page is an error: add the heading and a table under it first."""
    text = page.read_text(encoding="utf-8")
    tables = page_tables(text)
    rendered = {heading: table(parser) for heading, parser in parsers().items()}
    missing = sorted(set(rendered) - set(tables))
    if missing:
        raise SystemExit(f"{page}: no table under ## `{'`, ## `'.join(missing)}`")
    changed = [heading for heading in rendered if tables[heading] != rendered[heading]]

    def replace(match: re.Match) -> str:
        heading = match.group(1)
        if heading not in rendered:
            return match.group(0)
        ending = "\n" if match.group(2).endswith("\n") else ""
        return f"## `{heading}`\n\n{rendered[heading]}{ending}"

    page.write_text(TABLE.sub(replace, text), encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--write", action="store_true", help=f"update the tables of {PAGE.relative_to(PAGE.parents[2])}")
    args = cli.parse_args(argv)
    if args.write:
        changed = write()
        sys.stdout.write(f"updated: {', '.join(changed)}\n" if changed else "every table was up to date\n")
        return 0
    for heading, parser in parsers().items():
        sys.stdout.write(f"## `{heading}`\n\n{table(parser)}\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
