"""``ragr1-verl-demo``: a few real RAG-R1 training steps on this machine's CPU, with one command.

It starts the demo retriever (the bundled corpus, its index built and cached on first use), prepares the
default model and data (:mod:`ragr1_verl.cpu.assets`), runs verl's own trainer::

    python -m verl.trainer.main_ppo +recipe=ragr1_cpu ragr1.retriever.url=<demo retriever> ...

and prints one row of training metrics per step as it finishes, then the validation result. The retriever
and every process the trainer started (Ray included) are stopped however the run ends. Arguments it does
not know are passed to ``main_ppo`` as Hydra overrides (``trainer.total_training_steps=5``, ...).

What it shows: every real part of RAG-R1 training runs (multi-turn rollout with searches against the
retriever, EM reward, reference and critic, GAE, PPO updates, weight sync to the rollout, validation).
What it does not: a 135M model trained for a few steps learns little; the metrics move by chance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("ragr1-verl-demo")

RECIPES = {"ppo": "ragr1_cpu", "grpo": "ragr1_cpu_grpo"}
# (header, metric keys tried in order, format); the rollout-text columns are filled from the dumps.
COLUMNS = (
    ("step", (), "{:>4}"),
    ("reward(EM)", ("critic/score/mean",), "{:>10.3f}"),
    ("searches/traj", ("ragr1/searches_per_trajectory",), "{:>13.2f}"),
    ("queries/search", ("ragr1/queries_per_search",), "{:>14.2f}"),
    ("answered", ("ragr1/answered",), "{:>8.2f}"),
    ("turns", ("num_turns/mean",), "{:>5.1f}"),
    ("KL", ("actor/reward_kl_penalty", "actor/kl_loss"), "{:>9.2e}"),
    ("rollout~actor dp", ("training/rollout_probs_diff_max",), "{:>16.1e}"),
    ("step s", ("timing_s/step",), "{:>6.1f}"),
)
MILESTONES = {"ray init kwargs": "starting Ray and the verl workers",
              "LLMServerManager:": "rollout server (transformers on CPU) up, first rollout running"}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragr1-verl-demo", description=__doc__.split("\n\n")[0],
        epilog="Other arguments are Hydra overrides for main_ppo, e.g. trainer.total_training_steps=5")
    parser.add_argument("--algorithm", choices=sorted(RECIPES), default="ppo",
                        help="ppo: PPO with a critic as the paper trains (recipe ragr1_cpu); grpo: ragr1_cpu_grpo")
    parser.add_argument("--steps", type=int, default=None, help="training steps (the recipe's default: 3)")
    parser.add_argument("--model", default=None, help="a transformers model folder instead of SmolLM2-135M")
    parser.add_argument("--retriever-url", default=None,
                        help="use this running retriever instead of starting the demo one")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where logs, metrics and rollout dumps go (default: a new folder in ./ragr1-cpu-runs)")
    parser.add_argument("--log-level", default="INFO")
    return parser


@dataclass
class Run:
    """One training run: its folder and what has been printed of it."""

    folder: Path
    printed_steps: set[int] = field(default_factory=set)
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.folder / "train.log"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.jsonl"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same clean-up path as Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    args, overrides = make_parser().parse_known_args(argv)
    bad = [item for item in overrides if "=" not in item]
    if bad:
        make_parser().error(f"unknown arguments {bad} (Hydra overrides look like key=value)")
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    run = Run(_run_folder(args.run_dir))
    started = time.monotonic()
    with _retriever(args.retriever_url) as url:
        command = training_command(args, url, run, overrides)
        _prepare_assets(args, overrides)
        code = _train(command, run)
    _print_summary(run, code, time.monotonic() - started)
    return code


def _run_folder(requested: Path | None) -> Path:
    folder = requested or Path("ragr1-cpu-runs") / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve()


def training_command(args: argparse.Namespace, url: str, run: Run, overrides: Sequence[str]) -> list[str]:
    """The ``main_ppo`` command line: the recipe, the retriever, where metrics and rollouts go, then the
    user's overrides (last, so they win)."""
    command = [sys.executable, "-m", "verl.trainer.main_ppo", f"+recipe={RECIPES[args.algorithm]}",
               f"ragr1.retriever.url={url}", "trainer.logger=[console,file]",
               f"trainer.rollout_data_dir={run.folder / 'rollouts'}",
               f"trainer.validation_data_dir={run.folder / 'validation'}"]
    if args.steps is not None:
        command += [f"trainer.total_training_steps={args.steps}", f"trainer.test_freq={args.steps}"]
    if args.model is not None:
        command.append(f"actor_rollout_ref.model.path={Path(args.model).expanduser().resolve()}")
    return command + list(overrides)


def _prepare_assets(args: argparse.Namespace, overrides: Sequence[str]) -> None:
    """Build the default model and data now, so the first run's one-off work shows as such."""
    from ragr1_verl.cpu import assets

    if args.model is None and not any(item.startswith("actor_rollout_ref.model.path=") for item in overrides):
        logger.info("model: %s", assets.ensure_demo_model())
    logger.info("data: %s", assets.ensure_demo_data())


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


def _train(command: list[str], run: Run) -> int:
    """Run ``main_ppo`` with its output in ``train.log``; print rows as steps finish; clean up after it."""
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(run.metrics), WANDB_MODE="disabled", RAGR1_CPU_BACKEND="1")
    logger.info("training: %s\n(full output in %s)", " ".join(command), run.log)
    _print_header()
    with open(run.log, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=run.folder, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        family = ProcessTree(process.pid)
        try:
            for line in process.stdout:
                log.write(line)
                _on_output_line(line, run, family)
            return process.wait()
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping the trainer")
            return 130
        finally:
            family.stop(process)
            _print_new_rows(run, final=True)


def _on_output_line(line: str, run: Run, family: ProcessTree) -> None:
    for marker, message in MILESTONES.items():
        if marker in line:
            logger.info("  ... %s", message)
    if "step:" in line or "Dumped generations" in line:
        _print_new_rows(run)
    family.refresh()


class ProcessTree:
    """The trainer's process tree (Ray's processes included), remembered while it runs so that every one
    of them can be stopped by id at the end, even those the trainer leaves behind when it dies."""

    def __init__(self, pid: int):
        self.pid, self.known, self._checked = pid, set(), 0.0

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._checked < 2.0:
            return
        self._checked = time.monotonic()
        with contextlib.suppress(Exception):
            import psutil

            self.known.update(child.pid for child in psutil.Process(self.pid).children(recursive=True))

    def survivors(self, timeout: float = 0.0) -> list[int]:
        """The tree's processes still running after up to ``timeout`` seconds."""
        return _wait_gone(self.known, timeout)

    def stop(self, process: subprocess.Popen) -> None:
        """Stop the trainer (if still running), then whatever of its tree outlives it: Ray's processes get
        a grace period to exit on their own after a normal end, then SIGTERM, then SIGKILL."""
        self.refresh(force=True)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # the trainer's own session, started by us
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        if process.poll() is None:
            process.kill()
            process.wait()
        leftovers = self.survivors(timeout=10.0)
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            if not leftovers:
                break
            logger.info("stopping %d leftover trainer/Ray process(es): %s", len(leftovers), leftovers)
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            leftovers = _wait_gone(leftovers, timeout=grace)


def _wait_gone(pids: set[int] | list[int], timeout: float) -> list[int]:
    """The pids still running after up to ``timeout`` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


# -- metrics -----------------------------------------------------------------------------------------------

def read_metrics(path: Path) -> dict[int, dict[str, Any]]:
    """verl's file logger output: one ``{"step": n, "data": {...}}`` line per step."""
    steps: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                steps.setdefault(int(record["step"]), {}).update(record["data"])
    return steps


def model_text(response: str) -> str:
    """A dumped response without what the rollout inserted (results, format reminders), which quotes the tags.

    verl's dump holds the decoded text, not the loss mask, so the inserted messages are recognised by their
    fixed wording from :mod:`ragr1_verl.protocol`.
    """
    import re

    from ragr1_verl.protocol import INVALID_ACTION_REMINDER, invalid_search, strip_information

    before, _, after = invalid_search("\x00").partition("\x00")
    text = strip_information(response).replace(INVALID_ACTION_REMINDER, " ")
    return re.sub(f"{re.escape(before)}.*?{re.escape(after)}", " ", text, flags=re.DOTALL)


def rollout_stats(path: Path) -> dict[str, float]:
    """Searches per trajectory, queries per search and the answered share, read from a rollout dump."""
    from ragr1_verl.protocol import extract_answer, parse_action, split_queries

    searches = queries = answered = trajectories = 0
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        text = model_text(json.loads(line)["output"])
        trajectories += 1
        answered += extract_answer(text) is not None
        action = parse_action(text)
        while action.kind != "invalid":
            if action.kind == "search":
                searches += 1
                queries += len(split_queries(action.content).queries)
            text = text[action.end:]
            action = parse_action(text)
    if not trajectories:
        return {}
    return {"ragr1/searches_per_trajectory": searches / trajectories,
            "ragr1/queries_per_search": queries / searches if searches else 0.0,
            "ragr1/answered": answered / trajectories}


def _out(text: str, error: bool = False) -> None:
    """The launcher's console output (the table is for people; logs stay in train.log)."""
    print(text, file=sys.stderr if error else sys.stdout, flush=True)


def _print_header() -> None:
    _out("  ".join(f"{header:>{max(len(header), 4)}}" for header, _, _ in COLUMNS))


def _print_new_rows(run: Run, final: bool = False) -> None:
    """Rows for the steps whose metrics and rollout dump (written by a background thread) are both there."""
    for step, metrics in sorted(read_metrics(run.metrics).items()):
        dump = run.folder / "rollouts" / f"{step}.jsonl"
        if step in run.printed_steps or "timing_s/step" not in metrics or not (dump.is_file() or final):
            continue
        metrics.update(rollout_stats(dump))
        run.printed_steps.add(step)
        run.rows.append(dict(metrics, step=step))
        _out(format_row(step, metrics))


def format_row(step: int, metrics: dict[str, Any]) -> str:
    cells = []
    for header, keys, fmt in COLUMNS:
        width = max(len(header), 4)
        value = step if not keys else next((metrics[k] for k in keys if metrics.get(k) is not None), None)
        cells.append(fmt.format(value) if value is not None else "-".rjust(width))
        cells[-1] = cells[-1].rjust(width)
    return "  ".join(cells)


def validation_summary(metrics: dict[int, dict[str, Any]]) -> str | None:
    """The last validation's EM and searches, from the ``val-core``/``val-aux`` metrics."""
    for step in sorted(metrics, reverse=True):
        em = {k: v for k, v in metrics[step].items() if k.startswith("val-core/") and "/acc/" in k}
        if em:
            searches = [v for k, v in metrics[step].items() if k.startswith("val-aux/") and "/searches/" in k]
            parts = [f"EM {next(iter(em.values())):.3f}"]
            if searches:
                parts.append(f"searches/question {searches[0]:.2f}")
            return f"validation after step {step}: " + ", ".join(parts)
    return None


def _print_summary(run: Run, code: int, elapsed: float) -> None:
    summary = validation_summary(read_metrics(run.metrics))
    if summary:
        _out(summary)
    if code == 0:
        _out(f"done: {len(run.rows)} training step(s) in {elapsed:.0f} s; logs, metrics and rollouts in {run.folder}")
        return
    lines = run.log.read_text(encoding="utf-8", errors="replace").splitlines() if run.log.is_file() else []
    _out(f"training failed (exit code {code}) after {elapsed:.0f} s; last lines of {run.log}:", error=True)
    _out("\n".join(lines[-40:]), error=True)


if __name__ == "__main__":
    sys.exit(main())
