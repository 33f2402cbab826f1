"""``ragr1-data sft-generate``: teacher trajectories for stage-1 SFT and, optionally, the stage-2 RL set.

A teacher model behind an OpenAI-compatible server (the paper: Qwen2.5-72B-Instruct) answers each question
with the project's tag protocol and the real retriever, exactly as the policy does in RL (same prompt template,
query splitting, observation format and round budget). ``--teacher scripted`` replaces the model, for the demo
corpus only, by :class:`~ragr1_verl.data.teacher.scripted.ScriptedTeacher`, which plays the demo questions' hop
metadata through the same retriever and episode logic. Every trajectory is logged; the exact-match ones are
the SFT data. With ``--select-rl-data`` the missed questions are re-sampled and the paper's RL data selection
writes ``train.parquet``/``test.parquet``. The pieces live in :mod:`ragr1_verl.data.teacher`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ragr1_verl.config import CHOICES, PROMPT_TEMPLATE_HELP, RagR1Config, load_config
from ragr1_verl.data.questions import (
    DEMO_SOURCE,
    Question,
    demo_questions,
    read_question_file,
    resolve_template,
    sample_questions,
)
from ragr1_verl.data.teacher.episode import RetrievalFailed
from ragr1_verl.data.teacher.runner import RunSettings, RunSummary, generate
from ragr1_verl.data.teacher.scripted import ScriptedTeacher, token_counter
from ragr1_verl.data.teacher.selection import SelectionSettings
from ragr1_verl.data.teacher.store import ATTEMPTS_FILE, KEPT_FILE
from ragr1_verl.environment import OPENAI_API_KEY, RETRIEVER_URL, TEACHER_API_KEY
from ragr1_verl.openai_client import (
    Messages,
    Sampling,
    TeacherError,
    TeacherSettings,
    template_renderer,
)
from ragr1_verl.protocol.observation import Codec, policy_codec
from ragr1_verl.protocol.prompts import PromptRecord
from ragr1_verl.records import DataError, positive_int
from ragr1_verl.retrieval_client import DEFAULT_RETRIEVER_URL
from ragr1_verl.settings import add_setting_argument

logger = logging.getLogger(__name__)

TEACHERS = ("openai", "scripted")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sft-generate", help="generate SFT trajectories with a teacher model (and select the RL data)",
        description="Run a teacher model (an OpenAI-compatible server) on the questions with the project's search "
                    "protocol and retriever; log every trajectory, keep the exact matches as SFT data, and with "
                    "--select-rl-data write the paper's stage-2 RL set (train.parquet, test.parquet). Rerun the "
                    "same command to resume.")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help=f"output folder: {ATTEMPTS_FILE} (every trajectory), {KEPT_FILE} (exact matches), "
                             "run.json; with --select-rl-data also train.parquet, test.parquet, rl_selection.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it shows on a terminal only)")
    _question_arguments(parser.add_argument_group("questions"))
    _teacher_arguments(parser.add_argument_group("teacher"))
    _protocol_arguments(parser.add_argument_group("protocol and retriever (as the rollout's ragr1 settings)"))
    _selection_arguments(parser.add_argument_group("RL data selection (the paper's stage-2 set)"))
    parser.set_defaults(func=run)


def _question_arguments(group: argparse._ArgumentGroup) -> None:
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, metavar="FILE",
                        help="questions: .jsonl/.json/.parquet with FlashRAG rows {id, question, golden_answers: "
                             "[...]} or RAG-R1 rows {question, golden_answers: '...'}")
    source.add_argument("--source", choices=(DEMO_SOURCE,),
                        help="demo: the train part of the questions bundled with the retriever's demo corpus")
    group.add_argument("--data-source", default=None, metavar="NAME",
                       help="data_source of rows that carry none (default: the file's stem)")
    group.add_argument("--limit", type=positive_int, default=None, metavar="N",
                       help="a seeded random subset of N questions (the paper used part of HotpotQA's train set)")
    group.add_argument("--seed", type=int, default=42,
                       help="seed of the subset and of the RL data selection (default 42)")


def _teacher_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--teacher", choices=TEACHERS, default="openai",
                       help="openai (default): a model behind an OpenAI-compatible server (--teacher-url, "
                            "--teacher-model); scripted: no model, plays the demo questions' hop metadata through "
                            "the retriever (--source demo only; a stand-in for the paper's Qwen2.5-72B teacher)")
    group.add_argument("--teacher-url", default=None, metavar="URL",
                       help="OpenAI base URL of the server, e.g. http://host:8000/v1 (required with --teacher openai)")
    group.add_argument("--teacher-model", default=None, metavar="NAME",
                       help="the model name the server serves (required with --teacher openai)")
    group.add_argument("--api", choices=("completions", "chat"), default="completions",
                       help="completions (default): chat template rendered here (needs --tokenizer), works on "
                            "any server; chat: vLLM/SGLang continue_final_message")
    group.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH",
                       help="the teacher's tokenizer (path or hub name) for its chat template; with --teacher "
                            "scripted, the policy's. Also the --max-obs-tokens-per-query budget's unless "
                            "--policy-tokenizer is given")
    group.add_argument("--policy-tokenizer", default=None, metavar="NAME_OR_PATH",
                       help="the tokenizer of the model these rows will train: the per-query budget of retrieved "
                            "text (--max-obs-tokens-per-query) counts in it, as the rollout does (default: --tokenizer)")
    group.add_argument("--api-key", default=None, metavar="KEY", help=f"default: ${TEACHER_API_KEY.name}, else ${OPENAI_API_KEY.name}")
    group.add_argument("--temperature", type=float, default=0.7, metavar="T",
                       help="sampling temperature of the first attempt (default 0.7; the paper does not give it)")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P", help="default 1.0")
    add_setting_argument(group, RagR1Config, "max_tokens_per_turn", type=positive_int, metavar="N", default=1024,
                         help_suffix="(the teacher's cap here)")
    group.add_argument("--concurrency", type=positive_int, default=32, metavar="N",
                       help="trajectories in flight (default 32)")
    group.add_argument("--teacher-timeout", type=float, default=600.0, metavar="S",
                       help="seconds for one request (default 600)")
    group.add_argument("--teacher-retries", type=int, default=5, metavar="N",
                       help="retries of a request after a connection error, timeout, 408, 429 or 5xx (default 5)")
    group.add_argument("--teacher-backoff", type=float, default=1.0, metavar="S",
                       help="base of the exponential backoff between retries, in seconds (default 1)")
    group.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                       help='JSON object merged into every request, e.g. \'{"top_k": 20}\'')


def _protocol_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--retriever-url", default=None, metavar="URL",
                       help=f"the retriever's /retrieve URL (default: ${RETRIEVER_URL.name}, else {DEFAULT_RETRIEVER_URL})")
    add_setting_argument(group, RagR1Config, "mode", choices=CHOICES["mode"])
    group.add_argument("--prompt-template", default=None, metavar="TEMPLATE",
                       help=f"{PROMPT_TEMPLATE_HELP} (default: the mode's)")
    add_setting_argument(group, RagR1Config, "max_turns", type=int, metavar="N")
    add_setting_argument(group, RagR1Config, "topk", type=positive_int, metavar="K")
    add_setting_argument(group, RagR1Config, "max_queries_per_search", type=positive_int, metavar="N",
                         deprecated=("--max-queries",))
    add_setting_argument(group, RagR1Config, "max_obs_tokens_per_query", type=positive_int, metavar="N",
                         deprecated=("--max-obs-tokens",),
                         help_suffix="Counted in --policy-tokenizer (else --tokenizer).")
    add_setting_argument(group, RagR1Config, "observation_format", choices=CHOICES["observation_format"])


def _selection_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--select-rl-data", action="store_true",
                       help="re-sample the missed questions and write the stage-2 RL parquet files")
    group.add_argument("--resample-limit", type=int, default=10, metavar="N",
                       help="re-samples of a missed question, stopping at the first exact match (default 10)")
    group.add_argument("--resample-temperature", type=float, default=1.2, metavar="T", help="default 1.2")
    group.add_argument("--resample-max-turns", type=int, default=10, metavar="N",
                       help="search rounds of a re-sample (default 10)")
    group.add_argument("--easy-fraction", type=float, default=0.25, metavar="F",
                       help="share of the questions answered right at first that is kept (default 0.25)")
    group.add_argument("--no-answerability-filter", action="store_true",
                       help="keep every missed question, without re-sampling (the paper's 'w/o Filter')")
    group.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                       help="share of the selected questions written to test.parquet (default 0.05; 0: none)")


def run(args: argparse.Namespace) -> int:
    """The subcommand: 0 on success, 1 when the teacher or retriever failed (rerun to resume), 2 on bad input."""
    try:
        settings, teacher_settings = build_settings(args)
    except ValueError as err:  # ConfigError included: it names the setting
        logger.error("error: %s", err)
        return 2
    questions = load_questions(args)
    if teacher_settings is None:
        codec, count = scripted_tools(args)
        teacher = ScriptedTeacher(questions, settings.config, count)
        running = generate(questions, settings, None, args.out, codec=codec, teacher=teacher,
                           teacher_fields=teacher.fields())
    else:
        render, codec = text_tools(args)
        running = generate(questions, settings, teacher_settings, args.out, render=render, codec=codec)
    try:
        summary = asyncio.run(running)
    except (TeacherError, RetrievalFailed) as err:
        logger.error("error: %s", err)
        logger.error("the finished trajectories are in %s; run the same command again to resume",
                     args.out / ATTEMPTS_FILE)
        return 1
    PromptRecord(settings.template, "ragr1-data sft-generate --prompt-template "
                 f"{args.prompt_template or settings.config.mode}").write(args.out)
    _report(summary, args.out)
    return 0


def build_settings(args: argparse.Namespace) -> tuple[RunSettings, TeacherSettings | None]:
    """The run's and the teacher's settings from the arguments (no teacher settings for ``--teacher scripted``);
    ``ValueError`` names a bad one."""
    scripted = getattr(args, "teacher", "openai") == "scripted"
    if scripted:
        if args.select_rl_data:
            raise ValueError("--teacher scripted is deterministic: re-sampling its misses would repeat them, so "
                             "--select-rl-data needs a model teacher")
        if args.input is not None:
            raise ValueError("--teacher scripted plays the demo questions' hop metadata: use --source demo")
    else:
        missing = [flag for flag, value in (("--teacher-url", args.teacher_url), ("--teacher-model",
                                                                                   args.teacher_model)) if not value]
        if missing:
            raise ValueError(f"--teacher openai needs {' and '.join(missing)}")
    section: dict[str, Any] = {
        "mode": args.mode, "topk": args.topk, "max_turns": args.max_turns,
        "max_queries_per_search": args.max_queries_per_search,
        "max_obs_tokens_per_query": args.max_obs_tokens_per_query,
        "max_tokens_per_turn": args.max_tokens_per_turn, "observation_format": args.observation_format,
        "retriever": {"url": args.retriever_url} if args.retriever_url else {},
    }
    config = load_config(section)  # --retriever-url wins; else $RAGR1_RETRIEVER_URL, else the local server
    selection = None
    if args.select_rl_data:
        selection = SelectionSettings(args.resample_limit, args.resample_temperature, args.resample_max_turns,
                                      args.easy_fraction, not args.no_answerability_filter, args.val_fraction,
                                      args.seed)
    # The scripted teacher does not sample: its manifest records temperature 0.
    sampling = (Sampling(0.0, 1.0, args.max_tokens_per_turn) if scripted
                else Sampling(args.temperature, args.top_p, args.max_tokens_per_turn))
    settings = RunSettings(config, resolve_template(args.prompt_template, config.mode), sampling, args.concurrency,
                           selection, progress=not args.no_progress)
    if scripted:
        return settings, None
    api_key = args.api_key or TEACHER_API_KEY.value() or OPENAI_API_KEY.value()
    teacher = TeacherSettings(args.teacher_url, args.teacher_model, args.api, api_key,
                              timeout_s=args.teacher_timeout, max_retries=args.teacher_retries,
                              backoff_base_s=args.teacher_backoff, extra_body=args.extra_body)
    return settings, teacher


def text_tools(args: argparse.Namespace) -> tuple[Callable[[Messages], str] | None, Codec | None]:
    """The teacher's chat-template renderer (completions API) and the tokenizer the budget of retrieved text
    counts in; :class:`DataError` when the completions API has no usable tokenizer."""
    if args.tokenizer is None and args.api == "completions":
        raise DataError("--api completions renders the teacher's chat template here: give --tokenizer (or use "
                        "--api chat with a vLLM/SGLang server)")
    teacher_tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    render = None
    if args.api == "completions":
        try:
            render = template_renderer(teacher_tokenizer)
        except ValueError as err:
            raise DataError(f"--tokenizer {args.tokenizer}: {err}") from None
    tokenizer = _budget_tokenizer(args, teacher_tokenizer)
    return render, None if tokenizer is None else policy_codec(tokenizer)


def scripted_tools(args: argparse.Namespace) -> tuple[Codec | None, Callable[[str], int] | None]:
    """What the policy's tokenizer gives the scripted teacher: the budget of retrieved text and the token count
    of a turn (kept under --max-tokens-per-turn)."""
    tokenizer = _budget_tokenizer(args, load_tokenizer(args.tokenizer) if args.tokenizer is not None else None)
    if tokenizer is None:
        logger.warning("turns are not held to --max-tokens-per-turn without --tokenizer")
        return None, None
    return policy_codec(tokenizer), token_counter(tokenizer)


def _budget_tokenizer(args: argparse.Namespace, tokenizer: Any) -> Any:
    """The tokenizer the budget of retrieved text counts in: the policy's, else ``tokenizer`` (the loaded
    ``--tokenizer``, or None)."""
    if args.policy_tokenizer is not None:
        return load_tokenizer(args.policy_tokenizer, "--policy-tokenizer")
    if tokenizer is None:
        logger.warning("no --policy-tokenizer or --tokenizer: retrieved text is not cut to --max-obs-tokens-per-query")
        return None
    if getattr(args, "teacher", "openai") != "scripted":
        logger.info("the --max-obs-tokens-per-query budget counts in the teacher's tokenizer (--tokenizer); give "
                    "--policy-tokenizer when the trained model's differs")
    return tokenizer


def load_questions(args: argparse.Namespace) -> list[Question]:
    """The questions of ``--input`` (or the demo set's train part: never its held-out test part); with
    ``--limit``, a seeded subset in input order."""
    if args.input is not None:
        questions = read_question_file(args.input, data_source=args.data_source, split="train")
    else:
        questions = demo_questions("train", part="train")
    return sample_questions(questions, args.limit, args.seed)


def load_tokenizer(name: str, flag: str = "--tokenizer") -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad name or folder
        raise DataError(f"{flag} {name}: cannot load it ({err})") from None


def _report(summary: RunSummary, out: Path) -> None:
    logger.info("%d trajectories written this run (%d exact matches, %d re-samples); %d teacher requests, "
                "%d retries", summary.written, summary.exact, summary.resamples, summary.teacher_requests,
                summary.teacher_retries)
    logger.info("%s holds %d exact-match trajectories", out / KEPT_FILE, summary.kept)
    if summary.selection is not None:
        logger.info("wrote %s: %d training and %d validation (test.parquet) questions", out,
                    summary.selection["train"], summary.selection["test"])


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value
