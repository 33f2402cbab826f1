"""``ragr1-verl-demo``: both stages of RAG-R1 on this machine's CPU, then the models compared, with one command.

It starts the demo retriever (the bundled corpus, its index built and cached on first use), prepares the
default model and data (:mod:`ragr1_verl.cpu.assets`), and runs the real tools, each in its own process:

1. stage 1, format-learning SFT: ``torchrun -m verl.trainer.sft_trainer +recipe=ragr1_sft_cpu`` on the
   offline teacher's trajectories; the checkpoint with the lowest validation loss is kept;
2. stage 2, RL: ``python -m verl.trainer.main_ppo +recipe=ragr1_cpu`` from that checkpoint, against the demo
   retriever, printing one row of the rollout's own metrics per step;
3. ``ragr1-eval`` of the base, after-SFT and after-RL models on the held-out demo questions (never used in
   SFT or RL), printed as one table, with a PNG of the SFT loss and the RL reward per step.

``--stages`` chooses the stages (``--stages rl`` is the quick RL-only run from the base model). Arguments it
does not know are Hydra overrides for ``main_ppo``; ``--sft-override`` passes them to the SFT trainer. The
retriever and every process a trainer started (Ray included) are stopped however the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragr1_verl.config import CHOICES
from ragr1_verl.cpu import demo_report as report
from ragr1_verl.cpu.demo_report import read_metrics, validation_summary  # noqa: F401 (tests import them here)
from ragr1_verl.cpu.processes import ProcessTree, run_logged  # noqa: F401 (tests import ProcessTree here)
from ragr1_verl.data.io import positive_int

logger = logging.getLogger("ragr1-verl-demo")

STAGES = ("sft", "rl", "eval")
RL_RECIPES = {"ppo": "ragr1_cpu", "grpo": "ragr1_cpu_grpo"}
SFT_RECIPES = {"mq": "ragr1_sft_cpu", "sq": "ragr1_sft_cpu_sq"}
EVAL_CONCURRENCY = 32  # held-out questions decoded together as one batch (ragr1-eval's batched CPU backend)
DEFAULT_RL_STEPS = 20  # enough for a reward curve; a step of 2 prompts costs about a minute on 2 cores
# The demo's RL batch: 2 prompts a step (the recipe's 4 doubles the step time: every phase is compute-bound).
# verl splits each phase's batch into micro-batches that must divide it.
RL_BATCH = ("data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "critic.ppo_mini_batch_size=2", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "critic.ppo_micro_batch_size_per_gpu=2")
MILESTONES = {"ray init kwargs": "starting Ray and the verl workers",
              "LLMServerManager:": "rollout server (transformers on CPU) up, first rollout running"}


class StageFailed(RuntimeError):
    """A stage's tool exited with an error; its log says why."""


def _stages(value: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [part for part in chosen if part not in STAGES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"stages are a comma-separated subset of {','.join(STAGES)}")
    return tuple(stage for stage in STAGES if stage in chosen)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragr1-verl-demo", description=__doc__.split("\n\n")[0],
        epilog="Other arguments are Hydra overrides for main_ppo, e.g. trainer.total_training_steps=5")
    parser.add_argument("--stages", type=_stages, default=STAGES,
                        help="comma-separated: sft (stage 1), rl (stage 2, from the SFT model when sft runs too), "
                             "eval (the held-out questions, every model of the run); 'rl' alone is the quick run")
    parser.add_argument("--mode", choices=CHOICES["mode"], default="mq",
                        help="mq: several queries per search (RAG-R1); sq: one query per search")
    parser.add_argument("--algorithm", choices=sorted(RL_RECIPES), default="ppo",
                        help="ppo: PPO with a critic as the paper trains (recipe ragr1_cpu); grpo: ragr1_cpu_grpo")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_RL_STEPS,
                        help="RL training steps of 2 prompts each; the held-out evaluation follows when eval is "
                             "a stage, else verl validates on the dev questions after the last step")
    parser.add_argument("--model", default=None, help="a transformers model folder instead of SmolLM2-135M")
    parser.add_argument("--sft-model", type=Path, default=None,
                        help="an earlier stage-1 result (a Hugging Face folder) to start RL from and evaluate as "
                             "the after-SFT model, instead of running stage 1")
    parser.add_argument("--sft-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for the SFT trainer (repeatable), e.g. trainer.total_epochs=3")
    parser.add_argument("--eval-limit", type=positive_int, default=None,
                        help="evaluate only the first N held-out questions (default: all)")
    parser.add_argument("--retriever-url", default=None,
                        help="use this running retriever instead of starting the demo one")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where logs, metrics, checkpoints and results go (default: ./ragr1-cpu-runs/<time>)")
    parser.add_argument("--log-level", default="INFO")
    return parser


@dataclass
class Run:
    """One demo run: its folder, its settings, the models it produced and what has been printed of it."""

    folder: Path
    args: argparse.Namespace
    overrides: list[str]
    retriever_url: str = ""
    models: dict[str, Path] = field(default_factory=dict)  # label -> HF folder, in the order produced
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time
    printed_steps: set[int] = field(default_factory=set)

    def path(self, *parts: str) -> Path:
        target = self.folder.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same clean-up path as Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    parser = make_parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [item for item in [*overrides, *args.sft_override] if "=" not in item]
    if bad:
        parser.error(f"unknown arguments {bad} (Hydra overrides look like key=value)")
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    run = Run(_run_folder(args.run_dir), args, list(overrides))
    started = time.monotonic()
    code = 0
    try:
        with _retriever(args.retriever_url) as url:
            run.retriever_url = url
            _run_stages(run)
    except StageFailed as failure:
        _out(str(failure), error=True)
        code = 1
    except KeyboardInterrupt:
        _out("interrupted", error=True)
        code = 130
    _print_summary(run, time.monotonic() - started)
    return code


def _run_folder(requested: Path | None) -> Path:
    folder = requested or Path("ragr1-cpu-runs") / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve()


def _run_stages(run: Run) -> None:
    run.models["base"] = _base_model(run)
    if run.args.sft_model is not None:
        run.models["sft"] = run.args.sft_model.expanduser().resolve()
    for stage, action in (("sft", _sft_stage), ("rl", _rl_stage), ("eval", _eval_stage)):
        if stage in run.args.stages:
            started = time.monotonic()
            _out(f"== stage {stage} ==")
            action(run)
            run.seconds[stage] = time.monotonic() - started
            _out(f"== stage {stage} done in {run.seconds[stage]:.0f} s ==")


def _base_model(run: Run) -> Path:
    """The starting model: ``--model``, a ``model.path`` override, or SmolLM2 converted once into the cache."""
    from ragr1_verl.cpu import assets

    for item in run.overrides:
        if item.startswith("actor_rollout_ref.model.path="):
            return Path(item.partition("=")[2]).expanduser().resolve()
    if run.args.model is not None:
        return Path(run.args.model).expanduser().resolve()
    return assets.ensure_demo_model()


@contextlib.contextmanager
def _retriever(url: str | None) -> Iterator[str]:
    """The demo retriever in this process (a waitress thread) for the run's duration, or the given URL."""
    if url:
        yield url
        return
    from retriever_server.demo import ensure_demo_index
    from retriever_server.http_server import serving
    from retriever_server.service import LoadOptions

    logger.info("starting the demo retriever (the index is built once, then cached)")
    # One thread each: its load is a few small batches, and training needs the cores.
    options = LoadOptions(omp_threads=1, torch_threads=1)
    with serving(ensure_demo_index("dense", show_progress=True), options=options) as (base_url, service):
        try:
            logger.info("demo retriever on %s (%d passages)", base_url, len(service.corpus))
            yield f"{base_url}/retrieve"
        finally:
            queries = service.metrics.registry.get_sample_value("ragr1_retriever_queries_total") or 0
            logger.info("the demo retriever answered %d search queries during the run", queries)
    logger.info("demo retriever stopped")


def _tool_env(metrics_file: Path) -> dict[str, str]:
    return dict(os.environ, VERL_FILE_LOGGER_PATH=str(metrics_file), WANDB_MODE="disabled", RAGR1_CPU_BACKEND="1")


# -- stage 1: SFT -----------------------------------------------------------------------------------------

def sft_command(run: Run, checkpoints: Path) -> list[str]:
    """verl's SFT trainer under torchrun (one CPU rank), the CPU SFT recipe, then the user's overrides."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "verl.trainer.sft_trainer", f"+recipe={SFT_RECIPES[run.args.mode]}",
               f"trainer.default_local_dir={checkpoints}", "trainer.logger=[console,file]",
               # the model only, as a Hugging Face folder: a demo run is not resumed (optimizer: 1 GB an epoch)
               "checkpoint.save_contents=[hf_model]"]
    if run.args.model is not None:
        command.append(f"model.path={run.models['base']}")
    return command + list(run.args.sft_override)


def _sft_stage(run: Run) -> None:
    from ragr1_verl.sft_checkpoints import mark_best, select_best

    checkpoints, metrics = run.path("sft", "checkpoints"), run.path("sft", "metrics.jsonl")
    command = sft_command(run, checkpoints)
    logger.info("SFT: %s\n(full output in %s)", " ".join(command), run.path("sft", "train.log"))
    progress = SFTProgress(metrics)
    code = run_logged(command, log=run.path("sft", "train.log"), cwd=run.folder, env=_tool_env(metrics),
                      on_line=progress.on_line)
    progress.report(final=True)
    if code:
        raise StageFailed(_failure("SFT", code, run.path("sft", "train.log")))
    best = select_best(checkpoints, [metrics])
    mark_best(checkpoints, best)
    _record_prompt(checkpoints, run.args.mode)
    run.models["sft"] = (checkpoints / "best" / "huggingface").resolve()
    _out(f"SFT: kept step {best.step} (validation loss {best.val_loss:.4f}): {run.models['sft']}")


@dataclass
class SFTProgress:
    """Prints the SFT loss every few steps and each validation loss, as verl's file logger writes them (a
    step's validation loss is logged after its training loss, so the two are printed apart)."""

    metrics: Path
    printed: set[int] = field(default_factory=set)
    validated: set[int] = field(default_factory=set)
    every: int = 5

    def on_line(self, line: str) -> None:
        if "step" in line or "val/loss" in line:
            self.report()

    def report(self, final: bool = False) -> None:
        steps = read_metrics(self.metrics)
        last = max(steps, default=0)
        for step, values in sorted(steps.items()):
            loss, val_loss = values.get(report.SFT_LOSS), values.get(report.SFT_VAL_LOSS)
            due = step % self.every == 0 or step == 1 or (final and step == last)
            if loss is not None and due and step not in self.printed:
                self.printed.add(step)
                _out(f"SFT step {step:>4}  loss {loss:.4f}")
            if val_loss is not None and step not in self.validated:
                self.validated.add(step)
                _out(f"SFT step {step:>4}  validation loss {val_loss:.4f}")


# -- stage 2: RL ------------------------------------------------------------------------------------------

def rl_command(run: Run, start_model: Path) -> list[str]:
    """The ``main_ppo`` command line: the recipe, the start model, the retriever, where metrics, rollouts and
    the final model go, then the user's overrides (last, so they win)."""
    folder = run.folder / "rl"
    command = [sys.executable, "-m", "verl.trainer.main_ppo", f"+recipe={RL_RECIPES[run.args.algorithm]}",
               f"actor_rollout_ref.model.path={start_model}", f"ragr1.retriever.url={run.retriever_url}",
               "trainer.logger=[console,file]", f"trainer.rollout_data_dir={folder / 'rollouts'}",
               f"trainer.validation_data_dir={folder / 'validation'}",
               f"trainer.default_local_dir={folder / 'checkpoints'}",
               # only the final actor, as a Hugging Face folder for ragr1-eval
               "trainer.save_freq=1000000", "actor_rollout_ref.actor.checkpoint.save_contents=[hf_model]",
               "critic.checkpoint.save_contents=[]"]
    if run.args.mode == "sq":
        command += ["ragr1.mode=sq", "ragr1.prompt_template=sq"]
    # the eval stage measures every model on the held-out questions: no extra validation pass then
    test_freq = -1 if "eval" in run.args.stages else run.args.steps
    command += [*RL_BATCH, f"trainer.total_training_steps={run.args.steps}", f"trainer.test_freq={test_freq}"]
    return command + [item for item in run.overrides if not item.startswith("actor_rollout_ref.model.path=")]


def _rl_stage(run: Run) -> None:
    from ragr1_verl.cpu import assets

    start = run.models.get("sft", run.models["base"])
    metrics = run.path("rl", "metrics.jsonl")
    logger.info("data: %s", assets.ensure_demo_data())
    command = rl_command(run, start)
    logger.info("RL: %s\n(full output in %s)", " ".join(command), run.path("rl", "train.log"))
    _out(report.rl_header())

    def on_line(line: str) -> None:
        for marker, message in MILESTONES.items():
            if marker in line:
                logger.info("  ... %s", message)
        if "step:" in line:
            _print_new_rl_rows(run, metrics)

    code = run_logged(command, log=run.path("rl", "train.log"), cwd=run.folder, env=_tool_env(metrics),
                      on_line=on_line)
    _print_new_rl_rows(run, metrics)
    summary = validation_summary(read_metrics(metrics))
    if summary:
        _out(summary)
    if code:
        raise StageFailed(_failure("RL", code, run.path("rl", "train.log")))
    run.models["rl"] = final_actor(run.folder / "rl" / "checkpoints")
    _record_prompt(run.folder / "rl" / "checkpoints", run.args.mode)


def _record_prompt(checkpoints: Path, mode: str) -> None:
    """The prompt the stage trained with (the mode's built-in one, as the demo data and recipes use), beside
    its checkpoints, for ragr1-eval's check."""
    from ragr1_verl.data.prompts import PromptRecord
    from ragr1_verl.protocol import default_template

    PromptRecord(default_template(mode), f"ragr1-verl-demo: the built-in {mode} prompt").write(checkpoints)


def _print_new_rl_rows(run: Run, metrics: Path) -> None:
    for step, values in sorted(read_metrics(metrics).items()):
        if step not in run.printed_steps and "timing_s/step" in values:
            run.printed_steps.add(step)
            _out(report.format_rl_row(step, values))


def final_actor(checkpoints: Path) -> Path:
    """The Hugging Face folder of the last saved actor (``global_step_N/actor/huggingface``)."""
    candidates = sorted(checkpoints.glob("global_step_*/actor/huggingface"),
                        key=lambda path: int(path.parent.parent.name.rpartition("_")[2]))
    if not candidates:
        raise StageFailed(f"RL: no saved actor model under {checkpoints}")
    return candidates[-1].resolve()


# -- evaluation ---------------------------------------------------------------------------------------------

def rollout_settings(run: Run) -> dict[str, Any]:
    """The RL recipe's rollout settings after the user's overrides, so that evaluation plays the same game."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    overrides = [f"+recipe={RL_RECIPES[run.args.algorithm]}",
                 *[item for item in run.overrides if item.startswith(("ragr1.", "data.max_"))]]
    if run.args.mode == "sq":
        overrides += ["ragr1.mode=sq", "ragr1.prompt_template=sq"]
    with initialize_config_module("verl.trainer.config", version_base=None):
        config = compose("ppo_trainer", overrides=overrides)
    ragr1 = OmegaConf.to_container(config.ragr1, resolve=False)
    return {"ragr1": ragr1, "prompt": int(config.data.max_prompt_length),
            "response": int(config.data.max_response_length)}


def eval_command(run: Run, label: str, model: Path, data: Path, settings: dict[str, Any]) -> list[str]:
    ragr1 = settings["ragr1"]
    command = [sys.executable, "-m", "ragr1_verl.evaluation.cli", "--data", str(data),
               "--out", str(run.folder / "eval" / label), "--overwrite", "--model", str(model),
               "--retriever-url", run.retriever_url, "--mode", run.args.mode, "--greedy",
               "--concurrency", str(EVAL_CONCURRENCY), "--max-prompt-tokens", str(settings["prompt"]),
               "--max-response-tokens", str(settings["response"]), "--max-turns", str(ragr1["max_turns"]),
               "--topk", str(ragr1["topk"]),
               "--max-obs-tokens-per-query", str(ragr1["max_obs_tokens_per_query"]),
               "--max-tokens-per-turn", str(ragr1["max_tokens_per_turn"])]
    if run.args.eval_limit:
        command += ["--limit", str(run.args.eval_limit)]
    return command


def _eval_stage(run: Run) -> None:
    from ragr1_verl.cpu import assets
    from ragr1_verl.evaluation.report import read_results

    data = assets.ensure_demo_data() / "test.parquet"
    settings = rollout_settings(run)
    rows: list[report.EvalRow] = []
    types = question_types()
    for label, model in run.models.items():
        started = time.monotonic()
        code = run_logged(eval_command(run, label, model, data, settings), log=run.path("eval", f"{label}.log"),
                          cwd=run.folder, env=dict(os.environ))
        if code:
            raise StageFailed(_failure(f"evaluation of {label}", code, run.path("eval", f"{label}.log")))
        records = read_results(run.folder / "eval" / label)
        rows += report.eval_rows(label, records, time.monotonic() - started, types)
        _out(f"evaluated {label}: {len(records)} held-out questions in {time.monotonic() - started:.0f} s")
    _out("\n" + report.eval_table(rows))
    run.path("eval", "table.txt").write_text(report.eval_table(rows) + "\n", encoding="utf-8")


def question_types() -> dict[str, str]:
    """Question text -> ``single-hop``, ``bridge`` or ``comparison``, from the demo question file."""
    from retriever_server.demo import load_demo_questions

    return {q["question"]: q.get("hops") or q["type"] for q in load_demo_questions()}


# -- output -------------------------------------------------------------------------------------------------

def _failure(stage: str, code: int, log: Path) -> str:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    return f"{stage} failed (exit code {code}); last lines of {log}:\n" + "\n".join(lines[-40:])


def _out(text: str, error: bool = False) -> None:
    """The launcher's console output (the tables are for people; the tools' logs stay in their files)."""
    print(text, file=sys.stderr if error else sys.stdout, flush=True)


def _print_summary(run: Run, elapsed: float) -> None:
    plot = report.write_plot(run.folder / "training.png", read_metrics(run.folder / "sft" / "metrics.jsonl"),
                             read_metrics(run.folder / "rl" / "metrics.jsonl"))
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in run.seconds.items())
    _out(f"done in {elapsed:.0f} s ({stages or 'no stage finished'}); logs, metrics, models and results in "
         f"{run.folder}" + (f"; plot: {plot}" if plot else ""))


if __name__ == "__main__":
    sys.exit(main())
