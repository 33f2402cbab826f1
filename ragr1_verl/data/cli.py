"""``ragr1-data``: build the parquet files that both training stages and the evaluation read.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``; the parser it adds sets
``func`` (taking the parsed arguments, returning an exit code). Modules are imported only when listed here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ragr1_verl.records import DataError

logger = logging.getLogger("ragr1_verl.data")

SUBCOMMAND_MODULES = (
    "ragr1_verl.data.rl",
    "ragr1_verl.data.benchmarks",
    "ragr1_verl.data.sft",
    "ragr1_verl.data.sft_generate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragr1-data", description="Prepare RAG-R1 datasets as verl parquet files.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except DataError as error:
        logger.error("error: %s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
