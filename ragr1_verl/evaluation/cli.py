"""``ragr1-eval``: evaluate a checkpoint with the training rollout on evaluation parquet files.

Writes into ``--out``: ``results.jsonl`` (one line per question: the full trajectory, answer, EM/F1,
searches, queries, seconds), ``summary.md`` / ``summary.json`` (per benchmark: EM, F1, retrieval rounds,
queries per search, seconds per question), ``em_per_benchmark.png`` and ``retrieval_rounds.png``, and
``run.json`` (the settings). A rerun with the same settings resumes; ``--compare OTHER_RUN`` adds
``comparison.md`` / ``comparison.json`` / ``comparison.png`` (the two runs side by side, EM with 95% bootstrap
intervals and the paired difference); ``--seed-runs`` adds each seed's difference and the pooled one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragr1_verl.config import (
    CHOICES,
    PROMPT_TEMPLATE_HELP,
    ConfigError,
    RagR1Config,
    load_config,
    resolve_prompt_template,
)
from ragr1_verl.environment import OPENAI_API_KEY, RETRIEVER_TOKEN, RETRIEVER_URL
from ragr1_verl.evaluation import report
from ragr1_verl.evaluation.protocols import (
    PROTOCOL_NAMES,
    PROTOCOLS,
    EvalProtocol,
    SamplingDefaults,
    generation_config_sampling,
)
from ragr1_verl.evaluation.runner import (
    RESULTS_FILE,
    RUN_FILE,
    EvalSettings,
    Evaluator,
    finished_ids,
    load_questions,
    settings_record,
    trainer_config,
)
from ragr1_verl.protocol.prompts import warn_if_untrained_prompt
from ragr1_verl.records import DataError, positive_int
from ragr1_verl.retrieval_client import DEFAULT_RETRIEVER_URL
from ragr1_verl.settings import add_setting_argument

logger = logging.getLogger("ragr1_verl.evaluation")

SMOLLM2 = "smollm2"



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragr1-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", nargs="+", metavar="PARQUET", help="evaluation files (ragr1-data eval)")
    parser.add_argument("--demo", action="store_true",
                        help="evaluate on the held-out demo questions with the demo retriever started in-process "
                             "(needs the retriever extra); --data and --retriever-url are then not needed")
    parser.add_argument("--out", required=True, type=Path, help="run folder (created; resumed if present)")
    backend = parser.add_argument_group("generation")
    backend.add_argument("--backend", choices=("transformers", "openai"), default="transformers",
                         help="transformers: a local model; openai: an OpenAI-compatible /v1/completions server")
    backend.add_argument("--model", default="smollm2",
                         help="model folder (transformers), or the tokenizer folder of the served model (openai); "
                              "'smollm2' is the offline SmolLM2-135M-Instruct")
    backend.add_argument("--server-url", help="openai: base URL of a vLLM/SGLang server, e.g. http://host:8000")
    backend.add_argument("--served-model-name", help="openai: the server's model name (default: --model)")
    backend.add_argument("--api-key", default=OPENAI_API_KEY.value(),
                         help=f"openai: bearer token (env {OPENAI_API_KEY.name})")
    backend.add_argument("--device", default="auto", help="transformers: cpu, cuda, cuda:1, or auto")
    backend.add_argument("--concurrency", type=positive_int,
                         help="questions in flight (default: 32 for openai; 1 for transformers). With "
                              "transformers on the CPU, more than 1 decodes the questions in flight as one batch "
                              "(much faster per question; seconds per question then include the wait)")
    parser.add_argument("--protocol", choices=PROTOCOL_NAMES, default="project",
                        help="project: the training rollout's rules; paper: the original evaluation script's "
                             "(1024 tokens a call, 5 searches and no final round, no cut of retrieved text, its "
                             "normaliser, the first gold answer, sampling from the checkpoint's generation "
                             "config). It sets the defaults of the flags marked (protocol); given flags win")
    backend.add_argument("--temperature", type=float, help="(protocol) 0.7 in both, the paper's")
    backend.add_argument("--top-p", type=float,
                         help="(protocol) project: 1; paper: the checkpoint's generation config")
    backend.add_argument("--top-k", type=int, help="(protocol) project: off (-1); paper: the generation config")
    backend.add_argument("--repetition-penalty", type=float,
                         help="(protocol) project: 1; paper: the generation config")
    backend.add_argument("--greedy", action="store_true", help="temperature 0")
    backend.add_argument("--seed", type=int, default=0, help="sampling seed (sent to the server as `seed`)")
    backend.add_argument("--max-prompt-tokens", type=positive_int, default=2048,
                         help="longer prompts are cut, as verl cuts them (rollout.prompt_length)")
    backend.add_argument("--max-response-tokens", type=positive_int,
                         help="(protocol) all rounds and observations together (rollout.response_length); "
                              "project: 6144; paper: 30720 (the script has no cap but the model's context)")
    _add_rollout_arguments(parser)
    parser.add_argument("--limit", type=positive_int, help="evaluate the first N questions of each file")
    parser.add_argument("--overwrite", action="store_true", help="discard previous results in --out")
    parser.add_argument("--compare", type=Path, metavar="RUN_DIR",
                        help="another run to put side by side: each EM with its 95 percent confidence interval "
                             "(bootstrap over questions), and this run's EM minus that run's, paired by question, "
                             "with its interval")
    parser.add_argument("--labels", nargs=2, metavar=("OTHER", "THIS"), help="names of --compare and --out")
    parser.add_argument("--seed-runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="with --compare: other runs of this run's model with other seeds, on the same "
                             "questions; adds each seed's paired EM difference against --compare and the one "
                             "pooled over the seeds (each question's difference averaged over them)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def _add_rollout_arguments(parser: argparse.ArgumentParser) -> None:
    rollout = parser.add_argument_group("rollout (the ragr1 section; see docs/reference/configuration.md)")
    rollout.add_argument("--retriever-url", default=RETRIEVER_URL.value() or DEFAULT_RETRIEVER_URL,
                         help=f"ragr1.retriever.url (env {RETRIEVER_URL.name})")
    rollout.add_argument("--retriever-token", default=RETRIEVER_TOKEN.value(),
                         help=f"bearer token of the retriever (env {RETRIEVER_TOKEN.name})")
    add_setting_argument(rollout, RagR1Config, "mode", choices=CHOICES["mode"])
    add_setting_argument(rollout, RagR1Config, "max_turns", type=positive_int, default=None, help_prefix="(protocol)",
                         help_suffix="Here 5 in both protocols (the paper's evaluation): project adds one final "
                                     "round that can only answer, paper stops after the 5th search.")
    add_setting_argument(rollout, RagR1Config, "topk", type=positive_int)
    rollout.add_argument("--prompt-template",
                         help=f"{PROMPT_TEMPLATE_HELP}; or 'data' for the prompt stored in the data (default: the "
                              "template of --mode, re-rendered from extra_info.question)")
    add_setting_argument(rollout, RagR1Config, "max_obs_tokens_per_query", type=positive_int, default=None,
                         help_prefix="(protocol)", help_suffix="project: 1000 (training); paper: no cut.")
    add_setting_argument(rollout, RagR1Config, "max_tokens_per_turn", type=positive_int, default=None,
                         help_prefix="(protocol)", help_suffix="project: 500 (training); paper: 1024.")


def settings_from(args: argparse.Namespace) -> EvalSettings:
    protocol = PROTOCOLS[args.protocol]
    ragr1: dict[str, Any] = {
        "retriever": {"url": args.retriever_url, "token": args.retriever_token},
        "mode": args.mode, "topk": args.topk,
        "max_turns": _given(args.max_turns, protocol.max_turns), "final_round": protocol.final_round,
        "max_obs_tokens_per_query": _given(args.max_obs_tokens_per_query, protocol.max_obs_tokens_per_query),
        "max_tokens_per_turn": _given(args.max_tokens_per_turn, protocol.max_tokens_per_turn),
        "max_queries_per_search": protocol.max_queries_per_search,
    }
    # The mode's own instructions by default: an sq model must not see the mq prompt an eval file may hold.
    template = args.prompt_template or args.mode
    if template != "data":
        ragr1["prompt_template"] = template
    try:
        load_config(ragr1)
        if template != "data":
            resolve_prompt_template(template, args.mode)
    except (ConfigError, ValueError, OSError) as error:
        raise DataError(f"rollout settings: {error}") from None
    concurrency = args.concurrency or (32 if args.backend == "openai" else 1)
    sampling = _sampling_defaults(args, protocol)
    return EvalSettings(temperature=0.0 if args.greedy else _given(args.temperature, protocol.temperature),
                        top_p=_given(args.top_p, sampling.top_p), top_k=_given(args.top_k, sampling.top_k),
                        repetition_penalty=_given(args.repetition_penalty, sampling.repetition_penalty),
                        max_prompt_tokens=args.max_prompt_tokens,
                        max_response_tokens=_given(args.max_response_tokens, protocol.max_response_tokens),
                        concurrency=concurrency, ragr1=ragr1, protocol=protocol.name)


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _sampling_defaults(args: argparse.Namespace, protocol: EvalProtocol) -> SamplingDefaults:
    """The paper protocol samples as ``generate()`` does with the checkpoint: its generation config."""
    if not protocol.sampling_from_generation_config or args.greedy:
        return SamplingDefaults()
    defaults = generation_config_sampling(resolve_model(args.model))
    logger.info("paper protocol: top_p %s, top_k %s, repetition_penalty %s from %s", defaults.top_p,
                defaults.top_k, defaults.repetition_penalty, defaults.source)
    return defaults


def _run_identity(args: argparse.Namespace, settings: EvalSettings) -> dict[str, Any]:
    """The settings a resumed run must share with the first (the retriever token is left out)."""
    record = settings_record(settings, backend=args.backend, model=str(args.model),
                             served_model_name=args.served_model_name, data=[str(p) for p in args.data],
                             limit=args.limit, seed=args.seed)
    record["ragr1"] = {**record["ragr1"], "retriever": {"url": "demo" if args.demo else args.retriever_url}}
    del record["concurrency"]  # may change between a run and its resumption
    return record


def _check_out(args: argparse.Namespace, identity: dict[str, Any]) -> bool:
    """Whether ``--out`` already belongs to this run (``run.json`` equal); refuse one made with other settings."""
    if args.overwrite and args.out.exists():
        for name in (RESULTS_FILE, RUN_FILE):
            (args.out / name).unlink(missing_ok=True)
    run_file = args.out / RUN_FILE
    if not run_file.is_file():
        return False
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{run_file}: not valid JSON ({error.msg}); use --overwrite to start again") from None
    changed = sorted(key for key in identity.keys() | previous.keys() if identity.get(key) != previous.get(key))
    if changed:
        raise DataError(f"{run_file}: this run used other settings ({', '.join(changed)}); use another --out "
                        "or --overwrite")
    return True


def _write_run_file(out: Path, identity: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    staged = out / f"{RUN_FILE}.tmp"
    staged.write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
    os.replace(staged, out / RUN_FILE)


def resolve_model(name_or_path: str) -> Path | str:
    """A model folder or hub name; ``smollm2`` is the offline SmolLM2-135M-Instruct, converted once."""
    if name_or_path == SMOLLM2:
        from ragr1_verl.demo.assets import ensure_demo_model

        return ensure_demo_model()
    return Path(name_or_path) if Path(name_or_path).is_dir() else name_or_path  # else a hub name


def _load_backend(args: argparse.Namespace):
    """(model folder, tokenizer, backend)."""
    from transformers import AutoTokenizer

    from ragr1_verl.evaluation.backends import BatchedCPUBackend, OpenAIBackend, TransformersBackend

    model_dir = resolve_model(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except OSError as error:
        raise DataError(f"--model {args.model}: cannot load its tokenizer ({error})") from None
    if args.backend == "openai":
        name = args.served_model_name or str(args.model)
        return model_dir, tokenizer, OpenAIBackend(args.server_url, name, tokenizer, api_key=args.api_key,
                                                   seed=args.seed)
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu" and (args.concurrency or 1) > 1:
        return model_dir, tokenizer, BatchedCPUBackend(str(model_dir), seed=args.seed)
    # bf16 matmuls are slow on most CPUs: float32 there, the checkpoint's own dtype on GPUs
    dtype = torch.float32 if device == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model_dir, tokenizer, TransformersBackend(model, tokenizer)


async def _evaluate(args: argparse.Namespace, settings: EvalSettings, questions: list,
                    identity: dict[str, Any]) -> list[str]:
    """Run the questions not done yet; returns the ids that failed."""
    from tqdm import tqdm

    from ragr1_verl.retrieval_client import close_shared_clients

    done = finished_ids(args.out / RESULTS_FILE)
    todo = [question for question in questions if question.id not in done]
    logger.info("%d questions, %d already done, %d to run", len(questions), len(questions) - len(todo), len(todo))
    if not todo:
        return []
    model_dir, tokenizer, backend = _load_backend(args)
    if "prompt_template" in settings.ragr1:  # not with --prompt-template data: then the file's prompts are used
        warn_if_untrained_prompt(model_dir, resolve_prompt_template(settings.ragr1["prompt_template"], args.mode))
    _write_run_file(args.out, identity)  # only once the data, settings and model are known to be usable
    evaluator = Evaluator(trainer_config(model_dir, settings), tokenizer, backend, settings,
                          args.out / RESULTS_FILE)
    try:
        with tqdm(total=len(todo), desc="questions", unit="q", file=sys.stderr) as progress:
            return await evaluator.run(todo, progress)
    finally:
        await backend.close()
        await close_shared_clients()


def _run(args: argparse.Namespace) -> int:
    if args.backend == "openai" and not args.server_url:
        raise DataError("--backend openai needs --server-url")
    settings = settings_from(args)
    questions = load_questions(args.data, args.limit)  # bad data fails before anything is written
    identity = _run_identity(args, settings)
    _check_out(args, identity)
    failed = asyncio.run(_evaluate(args, settings, questions, identity))
    if failed:
        logger.error("%d question(s) failed (see above) and are not in the results; rerun the same command to "
                     "retry them", len(failed))
    return 1 if failed else 0


def _run_demo(args: argparse.Namespace) -> int:
    from ragr1_verl.demo.retriever import demo_data, demo_retriever

    args.out.mkdir(parents=True, exist_ok=True)
    args.data = [str(demo_data(args.out))]
    with demo_retriever() as url:
        args.retriever_url = url
        return _run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        code = 0
        if args.seed_runs and not args.compare:  # before a long evaluation, not after it
            raise DataError("--seed-runs needs --compare (the run the seeds are compared with)")
        if args.demo:
            code = _run_demo(args)
        elif args.data:
            code = _run(args)
        elif not args.compare:
            raise DataError("nothing to do: give --data to evaluate, or --compare to compare runs")
        if not (args.out / RESULTS_FILE).is_file():
            return code or 2  # nothing finished: no summary to write
        records = report.read_results(args.out)
        rows = report.write_summary(args.out, records)
        logger.info("%s\n\n%s", args.out, report.markdown_table(rows))
        if args.compare:
            other_records = report.read_results(args.compare)
            labels = args.labels or (args.compare.name, args.out.name)
            seed_runs = [(run.name, report.read_results(run)) for run in args.seed_runs or ()]
            try:
                table = report.write_comparison(args.out, labels[0], report.summarize(other_records), labels[1],
                                                rows, records_a=other_records,
                                                records_b=records, seed_runs=seed_runs)
            except ValueError as error:  # seed runs on other questions than --compare
                raise DataError(f"--seed-runs: {error}") from None
            logger.info("\n%s vs %s\n\n%s", labels[0], labels[1], table)
    except (DataError, FileNotFoundError) as error:
        logger.error("error: %s", error)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())

