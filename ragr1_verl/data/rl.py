"""``ragr1-data rl``: the stage-2 (RL) prompts as verl parquet, ``train.parquet`` and ``test.parquet``.

Sources:

- ``--source flashrag``: NQ + HotpotQA train from FlashRAG's collection, as Search-R1 trains; the test set
  is the same benchmarks' test split, else dev (``--test-datasets`` widens it to all seven, as Search-R1's
  merged test set).
- ``--source ragr1``: RAG-R1's released RL sets (HotpotQA questions the teacher found hard but answerable,
  plus a quarter of the easy ones), published as the hub dataset ``endertzw/RAG-R1-RL-data`` and in the
  code repository under ``data/RL/hotpotqa_train_filter{,_mq}/{train,test}_data.json``.
- ``--source demo``: the questions bundled with the retriever's demo corpus (no download).
- ``--input FILE``: a local jsonl/json/parquet file in FlashRAG's or RAG-R1's layout, with ``--test-input``
  or a seeded hold-out (``--test-size``, 5% by default as RAG-R1's split).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragr1_verl.config import CHOICES, PROMPT_TEMPLATE_HELP, RagR1Config
from ragr1_verl.data.benchmarks import (
    BENCHMARKS,
    FLASHRAG_HUB,
    download_hub_dataset,
    load_benchmark,
    parse_benchmarks,
)
from ragr1_verl.data.questions import (
    DEMO_SOURCE,
    Question,
    demo_questions,
    hold_out,
    read_question_file,
    resolve_template,
    rl_rows,
    sample_questions,
    write_rl_parquet,
)
from ragr1_verl.protocol.prompts import PromptRecord
from ragr1_verl.records import DataError, positive_int, staged_output
from ragr1_verl.settings import add_setting_argument

logger = logging.getLogger(__name__)

RAGR1_HUB = "endertzw/RAG-R1-RL-data"
RAGR1_FOLDERS = {"sq": "hotpotqa_train_filter", "mq": "hotpotqa_train_filter_mq"}  # RAG-R1's folder names
RAGR1_FILES = {"train": "train_data", "test": "test_data"}
DEFAULT_TEST_SIZE = 0.05
FLASHRAG_TRAIN = ("nq", "hotpotqa")  # Search-R1's training mix


@dataclass(frozen=True)
class RlSplits:
    """The train and test questions of a source, with a short description of where each came from."""

    train: list[Question]
    test: list[Question]
    origin: str


def _test_size(value: str) -> float:
    """``0.05`` (a fraction, below 1) or ``500`` (a count)."""
    number = float(value)
    if number <= 0 or (number >= 1 and not number.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a whole count, got {value}")
    return number



def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rl", help="RL training prompts (train.parquet, test.parquet) as verl parquet",
        description="Write the RL prompts as verl parquet (train.parquet and test.parquet in --out), from "
                    "FlashRAG's NQ + HotpotQA, RAG-R1's released RL sets, the bundled demo questions or a "
                    "local file.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", choices=("flashrag", "ragr1", DEMO_SOURCE),
                        help="flashrag: NQ + HotpotQA train (as Search-R1); ragr1: RAG-R1's RL sets; "
                             "demo: the bundled demo questions")
    source.add_argument("--input", metavar="FILE", help="local .jsonl/.json/.parquet question file")
    parser.add_argument("--out", required=True, help="output folder (train.parquet, test.parquet)")
    add_setting_argument(parser, RagR1Config, "mode", choices=CHOICES["mode"],
                         help_suffix="Here also the prompt template, and the RAG-R1 set for --source ragr1.")
    parser.add_argument("--prompt-template", default=None, metavar="TEMPLATE",
                        help=PROMPT_TEMPLATE_HELP)
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="at most N training questions, a seeded random subset (default: all)")
    parser.add_argument("--test-limit", type=positive_int, default=None, metavar="N",
                        help="at most N test questions, a seeded random subset (default: all)")
    parser.add_argument("--seed", type=int, default=42, help="seed of subsets and hold-outs (default 42)")
    _add_source_options(parser)
    parser.set_defaults(func=run)


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--test-input", metavar="FILE", help="with --input: the test questions' file")
    parser.add_argument("--test-size", type=_test_size, default=None, metavar="SIZE",
                        help="with --input (no --test-input): hold out this fraction "
                             f"(< 1) or count of questions as the test set (default {DEFAULT_TEST_SIZE}); --source demo "
                             "uses the questions' own train part and validation dev questions")
    parser.add_argument("--data-source", default=None, metavar="NAME",
                        help="with --input: data_source of rows that carry none (default: the file's stem)")
    parser.add_argument("--input-dir", default=None, metavar="DIR",
                        help="with --source flashrag or ragr1: a local copy of the hub dataset; the hub is "
                             "not used")
    parser.add_argument("--train-datasets", type=parse_benchmarks, default=list(FLASHRAG_TRAIN),
                        metavar="LIST",
                        help="with --source flashrag: training sets (default nq,hotpotqa)")
    parser.add_argument("--test-datasets", type=parse_benchmarks, default=list(FLASHRAG_TRAIN),
                        metavar="LIST",
                        help="with --source flashrag: test sets, test split else dev (default nq,hotpotqa; "
                             f"'all' = {','.join(BENCHMARKS)})")
    parser.add_argument("--ragr1-set", choices=("sq", "mq"), default=None,
                        help="with --source ragr1: which released set (default: --mode)")
    parser.add_argument("--hub-dataset", default=None, metavar="REPO",
                        help=f"hub dataset to read (default {FLASHRAG_HUB} or {RAGR1_HUB})")


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that the chosen source would silently ignore."""
    source = "input" if args.input else args.source
    allowed = {
        "input": {"test_input", "test_size", "data_source"},
        DEMO_SOURCE: set(),  # the questions' own split field decides
        "flashrag": {"input_dir", "hub_dataset"},
        "ragr1": {"input_dir", "hub_dataset", "ragr1_set"},
    }[source]
    for name in ("test_input", "test_size", "data_source", "input_dir", "hub_dataset", "ragr1_set"):
        if getattr(args, name) is not None and name not in allowed:
            raise DataError(f"--{name.replace('_', '-')} does not apply to {_describe(source)}")
    if args.test_input and args.test_size is not None:
        raise DataError("--test-size does not apply with --test-input")
    if source != "flashrag" and (args.train_datasets != list(FLASHRAG_TRAIN)
                                 or args.test_datasets != list(FLASHRAG_TRAIN)):
        raise DataError("--train-datasets and --test-datasets apply to --source flashrag only, "
                        f"not {_describe(source)}")


def _describe(source: str) -> str:
    return "--input" if source == "input" else f"--source {source}"


def load_splits(args: argparse.Namespace) -> RlSplits:
    """The train and test questions of the chosen source (nothing is written here)."""
    _check_options(args)
    if args.input:
        return _from_files(args)
    if args.source == DEMO_SOURCE:
        # train for training, the validation dev questions (16 of the 78 dev ones) for validation; the held-out
        # test part is for evaluation only
        train, val = demo_questions(part="train"), demo_questions(split="test", part="val")
        return RlSplits(train, val, "the bundled demo questions (train part; the validation dev questions as "
                        "the test file)")
    if args.source == "flashrag":
        return _from_flashrag(args)
    return _from_ragr1(args)


def _size(args: argparse.Namespace) -> float:
    return args.test_size if args.test_size is not None else DEFAULT_TEST_SIZE


def _from_files(args: argparse.Namespace) -> RlSplits:
    questions = read_question_file(args.input, data_source=args.data_source, split="train")
    if args.test_input:
        test = read_question_file(args.test_input, data_source=args.data_source, split="test")
        return RlSplits(questions, test, f"{args.input} and {args.test_input}")
    train, test = hold_out(questions, _size(args), args.seed, source=args.input)
    return RlSplits(train, test, f"{args.input} (seeded hold-out for test)")


def _from_flashrag(args: argparse.Namespace) -> RlSplits:
    hub = args.hub_dataset or FLASHRAG_HUB
    train = [q for name in args.train_datasets
             for q in load_benchmark(name, split="train", input_dir=args.input_dir, hub=hub).questions]
    test = [q for name in args.test_datasets
            for q in load_benchmark(name, split="auto", input_dir=args.input_dir, hub=hub).questions]
    return RlSplits(train, test, f"FlashRAG ({args.input_dir or hub})")


def _from_ragr1(args: argparse.Namespace) -> RlSplits:
    variant = args.ragr1_set or args.mode
    root = Path(args.input_dir) if args.input_dir else download_hub_dataset(args.hub_dataset or RAGR1_HUB)
    files = {role: _ragr1_file(root, variant, role) for role in RAGR1_FILES}
    source = RAGR1_FOLDERS[variant]  # RAG-R1's own data_source names
    train = read_question_file(files["train"], data_source=source, split="train")
    test = read_question_file(files["test"], data_source=source, split="test")
    return RlSplits(train, test, f"RAG-R1 {variant} set ({files['train'].parent})")


def _ragr1_file(root: Path, variant: str, role: str) -> Path:
    """``<root>/**/hotpotqa_train_filter[_mq]/{train,test}_data.json`` (or .jsonl, .parquet), else in root."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    folder_name, stem = RAGR1_FOLDERS[variant], RAGR1_FILES[role]
    # A folder named after the variant (at any depth: the repository's data/RL or the hub snapshot) wins
    # over files lying in root itself (root pointing straight at the variant's folder).
    candidates = sorted(path for path in root.rglob(folder_name) if path.is_dir()) + [root]
    for folder in candidates:
        for suffix in (".json", ".jsonl", ".parquet"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    raise DataError(f"{root}: no RAG-R1 {variant} {role} file (expected {folder_name}/{stem}.json somewhere "
                    f"below it); use --input and --test-input for other layouts")


def run(args: argparse.Namespace) -> int:
    template = resolve_template(args.prompt_template, args.mode)
    splits = load_splits(args)
    train = sample_questions(splits.train, args.limit, args.seed)
    test = sample_questions(splits.test, args.test_limit, args.seed)
    for role, questions in (("training", train), ("test", test)):
        if not questions:
            raise DataError(f"{splits.origin}: no {role} questions")
    with staged_output(args.out) as staging:
        write_rl_parquet(rl_rows(train, split="train", mode=args.mode, template=template),
                         staging / "train.parquet")
        write_rl_parquet(rl_rows(test, split="test", mode=args.mode, template=template),
                         staging / "test.parquet")
        PromptRecord(template, f"ragr1-data rl --prompt-template {args.prompt_template or args.mode}").write(staging)
    logger.info("wrote %d training and %d test prompts (%s, %s prompts) from %s to %s", len(train), len(test),
                args.mode, "custom" if args.prompt_template else "built-in", splits.origin, args.out)
    return 0

