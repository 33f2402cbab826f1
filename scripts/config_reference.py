"""The tables of docs/reference/configuration.md, generated: the ``ragr1:`` keys from the settings' fields, and
the environment variables from the two modules that read them (``ragr1_verl.environment``,
``retriever_server.environment``).

``python scripts/config_reference.py`` prints the tables; ``--write`` replaces the ones on the page.
``tests/ragr1_verl/test_config.py`` fails when the page and the fields disagree, so each setting's default,
the paper's value and its meaning are declared once, on its field (``ragr1_verl.settings.setting``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "configuration.md"
HEADERS = ("| key | default | paper | meaning |", "| variable | read by | meaning |")


def config_table() -> str:
    from ragr1_verl.config import reference_rows
    from ragr1_verl.settings import reference_table

    return reference_table(reference_rows())


def environment_table() -> str:
    from ragr1_verl import environment as plugin
    from retriever_server import environment as retriever

    lines = [HEADERS[1], "|---|---|---|"]
    lines += [f"| `{variable.name}` | the plugin | {variable.help} |" for variable in plugin.VARIABLES]
    lines += [f"| `{name}` | the retriever | {meaning} |" for name, meaning in retriever.VARIABLES.items()]
    return "\n".join(lines) + "\n"


def rendered() -> str:
    return config_table() + "\n" + environment_table()


def page_tables(text: str) -> list[str]:
    """The page's tables, in the order of HEADERS."""
    tables = []
    for header in HEADERS:
        match = re.search(r"^" + re.escape(header) + r"\n(?:\|.*\n?)+", text, re.MULTILINE)
        if match is None:
            raise ValueError(f"{PAGE}: no table with the header {header}")
        tables.append(match.group(0))
    return tables


def page_table(text: str) -> str:
    return "\n".join(page_tables(text))


def write(page: Path = PAGE) -> bool:
    """Replace the page's tables; True when they changed."""
    text = page.read_text(encoding="utf-8")
    new = text
    for old, generated in zip(page_tables(text), (config_table(), environment_table())):
        new = new.replace(old, generated, 1)
    page.write_text(new, encoding="utf-8")
    return new != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"update {PAGE.relative_to(PAGE.parents[2])}")
    args = parser.parse_args(argv)
    if args.write:
        changed = write()
        sys.stderr.write(f"{PAGE}: {'updated' if changed else 'already up to date'}\n")
    else:
        sys.stdout.write(rendered())
    return 0


if __name__ == "__main__":
    sys.exit(main())
