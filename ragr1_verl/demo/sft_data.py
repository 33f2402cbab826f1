"""Stage-1 SFT data for the demo corpus without an LLM: the scripted teacher, then ``ragr1-data sft``.

:func:`write_demo_sft_data` serves the demo dense index in this process, runs
:class:`~ragr1_verl.data.teacher.scripted.ScriptedTeacher` through ``sft-generate``'s runner over the demo
questions of the ``train`` part and over the dev questions that training-time validation uses (``part="val"``,
16 of the 78; never ``test``), with the ``ragr1:`` settings of the CPU RL recipe (``ragr1.yaml`` then
``ragr1_cpu.yaml``) and SmolLM2's tokenizer for the per-query cut, so the SFT trajectories look like the CPU
recipe's rollouts. The kept trajectories go through ``ragr1-data sft`` itself. No model runs: it takes seconds.

The scripted teacher is a stand-in for the paper's teacher (Qwen2.5-72B) that only works on the demo
corpus: it plays each question's hop metadata, which no real dataset has.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ragr1_verl.config import RagR1Config, load_config
from ragr1_verl.data.questions import demo_questions
from ragr1_verl.data.teacher.runner import RunSettings, generate
from ragr1_verl.data.teacher.scripted import ScriptedTeacher, searched_queries, token_counter
from ragr1_verl.data.teacher.store import ATTEMPTS_FILE, KEPT_FILE
from ragr1_verl.openai_client import Sampling
from ragr1_verl.protocol.observation import policy_codec
from ragr1_verl.protocol.prompts import default_template

logger = logging.getLogger(__name__)

RECIPES = ("ragr1.yaml", "ragr1_cpu.yaml")  # the CPU RL recipe builds on ragr1.yaml through Hydra defaults
# val.parquet holds the 16 validation dev questions only (part="val"): the validation loss costs what it did
PARTS = (("train", "train.parquet"), ("val", "val.parquet"))
SUMMARY_FILE = "summary.json"
CONCURRENCY = 8
# The teacher writes each turn within this share of the rollout's per-turn cap. A student imitating it writes a
# few tokens more at times, and with no room to spare those turns were cut before </answer>: on the 78 dev
# questions, 13% of the SFT model's trajectories broke the protocol at a cap equal to the teacher's budget (96)
# and 1% at 128 (run c01, docs/results/cpu-runs.md). 0.75 of the CPU recipe's 128 is the teacher's former 96.
TEACHER_TURN_SHARE = 0.75


def teacher_turn_tokens(config: RagR1Config) -> int:
    """The scripted teacher's token budget for one turn: :data:`TEACHER_TURN_SHARE` of the rollout's cap."""
    return max(1, int(config.max_tokens_per_turn * TEACHER_TURN_SHARE))


def cpu_recipe_section() -> dict[str, Any]:
    """The composed ``ragr1:`` section of ``+recipe=ragr1_cpu``: ragr1.yaml's, then ragr1_cpu.yaml's on top."""
    from importlib import resources

    from omegaconf import OmegaConf

    folder = resources.files("ragr1_verl.recipes").joinpath("recipe")
    sections = [OmegaConf.create(folder.joinpath(name).read_text(encoding="utf-8")).get("ragr1") or {}
                for name in RECIPES]
    return OmegaConf.to_container(OmegaConf.merge(*sections), resolve=True)


def cpu_recipe_config(mode: str = "mq", retriever_url: str | None = None) -> RagR1Config:
    """The CPU recipe's protocol settings in ``mode``, with the retriever at ``retriever_url`` (the environment's
    ``RAGR1_RETRIEVER_URL`` is ignored: the data must come from the retriever this process serves)."""
    section = cpu_recipe_section()
    section["mode"] = mode
    if retriever_url is not None:
        section["retriever"] = {**section.get("retriever", {}), "url": retriever_url}
    return load_config(section, environ={})


def write_demo_sft_data(out_dir: Path, model: Path, mode: str = "mq") -> tuple[Path, Path]:
    """``out_dir/train.parquet`` (the train-part questions) and ``out_dir/val.parquet`` (the validation dev
    questions, ``part="val"``) of the scripted teacher's exact-match trajectories, as ``ragr1-data sft``
    writes them; returns both paths.

    The teacher's files (``attempts.jsonl``, ``sft_trajectories.jsonl``, ``run.json``) are kept in
    ``out_dir/teacher-<part>``, the counts in ``out_dir/summary.json``.
    """
    from transformers import AutoTokenizer

    from retriever_server.demo import ensure_demo_index
    from retriever_server.http_server import serving

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    summary: dict[str, Any] = {"mode": mode}
    kept_files = {}
    with serving(ensure_demo_index("dense")) as (url, _service):
        config = cpu_recipe_config(mode, f"{url}/retrieve")
        for part, _ in PARTS:
            questions = demo_questions("train", part=part)
            folder = out_dir / f"teacher-{part}"
            asyncio.run(run_scripted(questions, config, folder, tokenizer))
            kept_files[part] = folder / KEPT_FILE
            summary[part] = trajectory_counts(folder / ATTEMPTS_FILE, config)
            logger.info("demo SFT data, %s part (%s): %s", part, mode, _describe(summary[part]))
    paths = convert(kept_files["train"], kept_files["val"], out_dir)
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return paths


async def run_scripted(questions: Sequence[Any], config: RagR1Config, out_dir: Path, tokenizer: Any = None,
                       *, concurrency: int = CONCURRENCY) -> Any:
    """``sft-generate``'s run with the scripted teacher: the rollout's round budget and per-query cut of
    retrieved text (with ``tokenizer``), and turns of at most :func:`teacher_turn_tokens` policy tokens."""
    codec, count = None, None
    if tokenizer is not None:
        codec, count = policy_codec(tokenizer), token_counter(tokenizer)
    settings = RunSettings(config, config.prompt_template or default_template(config.mode),
                           Sampling(0.0, 1.0, teacher_turn_tokens(config)), concurrency, progress=False)
    teacher = ScriptedTeacher(questions, config, count)
    return await generate(questions, settings, None, out_dir, codec=codec, teacher=teacher,
                          teacher_fields=teacher.fields())


def convert(train_kept: Path, val_kept: Path, out_dir: Path) -> tuple[Path, Path]:
    """``ragr1-data sft --input train_kept --val-input val_kept``, its test.parquet renamed val.parquet."""
    from ragr1_verl.data import sft
    from ragr1_verl.data.cli import build_parser

    train_path, val_path = out_dir / PARTS[0][1], out_dir / PARTS[1][1]
    staging = Path(tempfile.mkdtemp(prefix=".demo-sft-", dir=out_dir))
    try:
        inputs = ["--input", str(train_kept)]
        if _has_rows(val_kept):
            inputs += ["--val-input", str(val_kept)]
        else:  # `sft` refuses an empty input file; an empty validation set is still a valid file
            inputs += ["--val-fraction", "0"]
        args = build_parser().parse_args(["sft", *inputs, "--out", str(staging)])
        args.func(args)
        if not _has_rows(val_kept):
            sft.write_sft_parquet([], "test", staging / "test.parquet")
        os.replace(staging / "train.parquet", train_path)
        os.replace(staging / "test.parquet", val_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return train_path, val_path


def _has_rows(path: Path) -> bool:
    return path.is_file() and any(line.strip() for line in path.read_text(encoding="utf-8").splitlines())


def trajectory_counts(attempts: Path, config: RagR1Config) -> dict[str, Any]:
    """Questions generated, kept by exact match, mean searches per question and queries per search."""
    rows = [json.loads(line) for line in attempts.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [row for row in rows if row["em"] == 1 and row["attempt"] == 0]
    return {"generated": len(rows), "kept": len(kept), "finish": _tally(row["finish"] for row in rows),
            **{f"all_{key}": value for key, value in _search_means(rows, config).items()},
            **{f"kept_{key}": value for key, value in _search_means(kept, config).items()}}


def _tally(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _search_means(rows: Sequence[Mapping[str, Any]], config: RagR1Config) -> dict[str, float]:
    searches = queries = 0
    for row in rows:
        for asked in searched_queries(row["trajectory"], config):
            searches += 1
            queries += len(asked)
    return {"searches_per_question": round(searches / len(rows), 3) if rows else 0.0,
            "queries_per_search": round(queries / searches, 3) if searches else 0.0}


def _describe(counts: Mapping[str, Any]) -> str:
    return (f"{counts['generated']} generated, {counts['kept']} kept by EM; searches per question "
            f"{counts['kept_searches_per_question']} (all: {counts['all_searches_per_question']}), queries per "
            f"search {counts['kept_queries_per_search']} (all: {counts['all_queries_per_search']})")


