"""``ragr1-data eval``: the seven QA benchmarks of the paper as verl parquet, one file per benchmark.

The benchmarks come from FlashRAG's collection (the hub dataset ``RUC-NLPIR/FlashRAG_datasets``, one config
per benchmark, as Search-R1 prepares them) or from a local copy of it. Each benchmark is read from its test
split, else its dev split: the rule of the paper's baselines (HotpotQA, 2Wiki and MuSiQue have no public test
answers). ``data_source`` is the benchmark's name, so verl reports ``val-core/<benchmark>/...`` per benchmark.

The loaders here are shared with ``ragr1-data rl --source flashrag``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragr1_verl.config import CHOICES, PROMPT_TEMPLATE_HELP, RagR1Config
from ragr1_verl.data.questions import (
    DEMO_SOURCE,
    Question,
    demo_questions,
    parse_rows,
    read_question_file,
    resolve_template,
    rl_rows,
    sample_questions,
    write_rl_parquet,
)
from ragr1_verl.protocol.prompts import PromptRecord, default_template
from ragr1_verl.records import DataError, positive_int, staged_output
from ragr1_verl.settings import add_setting_argument

logger = logging.getLogger(__name__)

BENCHMARKS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
FLASHRAG_HUB = "RUC-NLPIR/FlashRAG_datasets"
SPLIT_PREFERENCE = ("test", "dev")  # the baselines' rule: the test split when it exists, else dev
SPLIT_CHOICES = ("auto", "test", "dev", "train")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class LoadedSplit:
    """The questions of one benchmark split, with the split actually used and where it was read from."""

    name: str
    split: str
    origin: str
    questions: list[Question]


def pick_split(available: Iterable[str], where_from: str) -> str:
    """``test`` if available, else ``dev``; a set with neither is refused rather than scored on train."""
    available = list(available)
    for split in SPLIT_PREFERENCE:
        if split in available:
            return split
    raise DataError(f"{where_from}: no test or dev split (found {sorted(available) or 'none'}); "
                    "pass --split to choose one")


def parse_benchmarks(value: str) -> list[str]:
    """A comma-separated subset of :data:`BENCHMARKS` (``all`` for every one), in the order given."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    if names == ["all"]:
        return list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {unknown or value!r}; choose from {', '.join(BENCHMARKS)} or 'all'")
    return list(dict.fromkeys(names))


def load_benchmark(name: str, *, split: str = "auto", input_dir: str | Path | None = None,
                   hub: str = FLASHRAG_HUB) -> LoadedSplit:
    """One FlashRAG benchmark split: from ``input_dir`` when given (never the hub then), else from ``hub``."""
    if input_dir is not None:
        chosen, path = _local_file(Path(input_dir), name, split)
        questions = read_question_file(path, data_source=name, split=chosen)
        return LoadedSplit(name, chosen, str(path), questions)
    chosen, rows, origin = _hub_rows(hub, name, split)
    return LoadedSplit(name, chosen, origin, parse_rows(rows, path=origin, data_source=name, split=chosen,
                                                        progress=True))


def _local_file(input_dir: Path, name: str, split: str) -> tuple[str, Path]:
    """``DIR/<name>/<split>.jsonl`` (FlashRAG's own layout) or one ``DIR/<name>.jsonl`` (or json, parquet)."""
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: no such folder")
    folder = input_dir / name
    if folder.is_dir():
        files = {path.name.split(".")[0]: path for path in sorted(folder.iterdir())
                 if path.is_file() and path.name.endswith(FILE_SUFFIXES)}
        chosen = pick_split(files, str(folder)) if split == "auto" else split
        if chosen not in files:
            raise DataError(f"{folder}: no {chosen} split file (found {sorted(files) or 'none'})")
        return chosen, files[chosen]
    singles = [path for path in (input_dir / f"{name}{suffix}" for suffix in FILE_SUFFIXES) if path.is_file()]
    if len(singles) > 1:
        names = ", ".join(path.name for path in singles)
        raise DataError(f"{input_dir}: several files for {name!r} ({names}); keep one")
    if not singles:
        raise DataError(f"{input_dir}: no file for benchmark {name!r} (expected {name}.jsonl, .json or "
                        f".parquet, or a folder {name}/ with test/dev files)")
    # One file per benchmark carries no split name: it is taken as the evaluation split.
    return ("test" if split == "auto" else split), singles[0]


def _hub_rows(hub: str, name: str, split: str) -> tuple[str, list[dict[str, Any]], str]:
    """The rows of one config of a hub dataset; any failure names the source and the offline remedy."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"hub dataset {hub!r}: the 'datasets' package is not installed; install it or pass a "
                        "local copy with --input-dir") from None
    try:
        available = datasets.get_dataset_split_names(hub, name)
        chosen = pick_split(available, f"hub dataset {hub!r} ({name})") if split == "auto" else split
        if chosen not in available:
            raise DataError(f"hub dataset {hub!r} ({name}): no {chosen} split (found {sorted(available)})")
        rows = datasets.load_dataset(hub, name, split=chosen).to_list()
    except DataError:
        raise
    # datasets raises many unrelated types (ConnectionError, FileNotFoundError, ValueError, its own errors)
    except Exception as error:  # noqa: BLE001
        raise hub_failure(f"hub dataset {hub!r} ({name}) could not be loaded", error) from None
    return chosen, rows, f"{hub}/{name}/{chosen}"


def hub_failure(what: str, error: BaseException) -> DataError:
    """The error for an unreachable or unknown hub source, with the offline remedy."""
    reason = str(error).rstrip(". ") or type(error).__name__  # ends in our own sentence
    return DataError(f"{what}: {reason}. Without network access, download it elsewhere and pass the folder "
                     "with --input-dir")


def download_hub_dataset(repo: str) -> Path:
    """A local snapshot of a hub dataset's data files (RAG-R1's RL or SFT sets); any failure names it."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DataError(f"hub dataset {repo!r}: huggingface_hub is not installed; pass a local copy with "
                        "--input-dir") from None
    try:
        return Path(snapshot_download(repo_id=repo, repo_type="dataset",
                                      allow_patterns=["*.json", "*.jsonl", "*.parquet"]))
    # huggingface_hub raises its own errors, requests' and OSError subclasses for the same network failure
    except Exception as error:  # noqa: BLE001
        raise hub_failure(f"hub dataset {repo!r} could not be downloaded", error) from None


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval", help="the seven QA benchmarks (or the demo questions) as verl parquet, one file each",
        description="Write one verl parquet per benchmark (nq, triviaqa, popqa, hotpotqa, 2wikimultihopqa, "
                    "musique, bamboogle) to --out, read from FlashRAG's test split, else its dev split. "
                    "data_source names the benchmark.")
    parser.add_argument("--out", required=True, help="output folder (one <benchmark>.parquet each)")
    parser.add_argument("--source", choices=("flashrag", DEMO_SOURCE), default="flashrag",
                        help="flashrag: the benchmarks from the hub or --input-dir (default); demo: the "
                             "bundled demo questions as demo.parquet, no download")
    parser.add_argument("--benchmarks", type=parse_benchmarks, default=None, metavar="LIST",
                        help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--input-dir", default=None, metavar="DIR",
                        help="local copy: DIR/<name>/{test,dev}.jsonl (FlashRAG's layout) or one "
                             "DIR/<name>.{jsonl,json,parquet} per benchmark; the hub is not used")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="auto",
                        help="split to read; auto = test, else dev (default)")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="at most N questions per benchmark, a seeded random subset (default: all)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the --limit subsets (default 42)")
    add_setting_argument(parser, RagR1Config, "mode", choices=CHOICES["mode"],
                         help_suffix="Here the prompt template.")
    parser.add_argument("--prompt-template", default=None, metavar="TEMPLATE",
                        help=PROMPT_TEMPLATE_HELP)
    parser.add_argument("--combined", action="store_true", help="also write all.parquet with every benchmark")
    parser.add_argument("--hub-dataset", default=FLASHRAG_HUB, metavar="REPO",
                        help=f"hub dataset of the benchmarks (default {FLASHRAG_HUB})")
    parser.set_defaults(func=run)



def load_all(args: argparse.Namespace) -> list[LoadedSplit]:
    """Every requested benchmark, subset by ``--limit``; loading finishes before anything is written."""
    if args.source == DEMO_SOURCE:
        if args.benchmarks is not None or args.input_dir is not None:
            raise DataError("--benchmarks and --input-dir do not apply to --source demo")
        questions = demo_questions(split="test", part="test")  # the held-out part, never trained on
        loaded = [LoadedSplit(DEMO_SOURCE, "test", "retriever_server/demo/questions.jsonl", questions)]
    else:
        loaded = [load_benchmark(name, split=args.split, input_dir=args.input_dir, hub=args.hub_dataset)
                  for name in (args.benchmarks or BENCHMARKS)]
    return [LoadedSplit(item.name, item.split, item.origin,
                        sample_questions(item.questions, args.limit, args.seed)) for item in loaded]


def write_benchmarks(loaded: Sequence[LoadedSplit], out: str | Path, *, mode: str, template: str,
                     combined: bool) -> list[Path]:
    """One ``<name>.parquet`` per benchmark (and ``all.parquet``), all or nothing.

    ``extra_info.index`` runs on across the benchmarks, so it stays unique when verl concatenates the files
    (``extra_info.id`` keeps each source's own id).
    """
    written, everything = [], []
    with staged_output(out) as staging:
        for item in loaded:
            rows = rl_rows(item.questions, split=item.split, mode=mode,  # type: ignore[arg-type]
                           template=template, start=len(everything))
            write_rl_parquet(rows, staging / f"{item.name}.parquet")
            written.append(Path(out) / f"{item.name}.parquet")
            everything += rows
        if combined:
            write_rl_parquet(everything, staging / "all.parquet")
            written.append(Path(out) / "all.parquet")
        PromptRecord(template or default_template(mode), "ragr1-data eval").write(staging)  # type: ignore[arg-type]
    return written


def run(args: argparse.Namespace) -> int:
    template = resolve_template(args.prompt_template, args.mode)
    loaded = load_all(args)
    empty = [item.origin for item in loaded if not item.questions]
    if empty:
        raise DataError(f"{', '.join(empty)}: no questions")
    write_benchmarks(loaded, args.out, mode=args.mode, template=template, combined=args.combined)
    for item in loaded:
        logger.info("%-16s %6d questions (%s split, from %s)", item.name, len(item.questions), item.split,
                    item.origin)
    logger.info("wrote %d parquet file(s) to %s", len(loaded) + int(args.combined), args.out)
    return 0

