"""``ragr1-verl-demo``: both stages of RAG-R1 on this machine's CPU, then the models compared, with one command.

It starts the demo retriever (the bundled corpus, its index built and cached on first use), prepares the
default model and data (:mod:`ragr1_verl.demo.assets`), and runs the real tools, each in its own process:

1. stage 1, format-learning SFT: ``torchrun -m verl.trainer.sft_trainer +recipe=ragr1_sft_cpu`` on the
   offline teacher's trajectories; the checkpoint with the lowest validation loss is kept;
2. stage 2, RL: ``python -m verl.trainer.main_ppo +recipe=ragr1_cpu`` from that checkpoint, against the demo
   retriever, printing one row of the rollout's own metrics per step;
3. ``ragr1-eval`` of the base, after-SFT and after-RL models on the held-out demo questions (never used in
   SFT or RL), printed as one table, with a PNG of the SFT loss and the RL reward per step.

``--stages`` chooses the stages (``--stages rl`` is the quick RL-only run from the base model). Arguments it
does not know are Hydra overrides for ``main_ppo``; ``--sft-override`` passes them to the SFT trainer. The
retriever and every process a trainer started (Ray included) are stopped however the run ends.

``--preset`` (:mod:`ragr1_verl.demo.presets`) chooses what the stages train with: ``quick`` (the default, the
short demo) or ``full``; explicit flags and overrides win over the preset's values. RL goes to
``rl-seed<N>/`` (``--seed N``), so that another seed in the same ``--run-dir`` adds to the run. Given the
folder of an earlier run, a stage whose output is complete is skipped (:func:`stage_done`) and an incomplete
one is started again; ``run.json`` records each command's settings and code version, ``progress.md`` each
stage's wall time and results as it ends, ``demo.log`` everything printed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragr1_verl import verl_compat
from ragr1_verl.config import CHOICES, RagR1Config
from ragr1_verl.data.sft import repeat_multi_search, write_sft_records
from ragr1_verl.demo import assets, report
from ragr1_verl.demo.presets import DEFAULT_PRESET, PRESETS, Preset, merge_overrides, override_key
from ragr1_verl.demo.processes import run_logged
from ragr1_verl.demo.report import read_metrics, validation_summary
from ragr1_verl.demo.summary import (
    SUMMARY_FILE,
    ModelEvaluation,
    RunSummary,
    SummaryError,
    read_summary,
    write_summary,
)
from ragr1_verl.environment import CPU_BACKEND
from ragr1_verl.evaluation.report import read_results
from ragr1_verl.records import positive_int, read_records, staged_output
from ragr1_verl.settings import add_setting_argument

logger = logging.getLogger("ragr1-verl-demo")

STAGES = ("sft", "rl", "eval")
RL_RECIPES = {"ppo": "ragr1_cpu", "grpo": "ragr1_cpu_grpo"}
SFT_RECIPES = {"mq": "ragr1_sft_cpu", "sq": "ragr1_sft_cpu_sq"}
EVAL_CONCURRENCY = 32  # held-out questions decoded together as one batch (ragr1-eval's batched CPU backend)
RUN_FILE = "run.json"  # each command's settings and code version
PROGRESS_FILE = "progress.md"  # each stage's wall time and results, appended as it ends
CONSOLE_LOG = "demo.log"  # everything the launcher prints
TIMINGS_FILE = "timings.json"  # stage -> wall seconds, for the table of a resumed run's skipped evaluations
RUN_IDENTITY = ("preset", "mode")  # a run folder holds one of each: resuming with others is refused
MILESTONES = {"ray init kwargs": "starting Ray and the verl workers",
              "LLMServerManager:": "rollout server (transformers on CPU) up, first rollout running"}


class StageFailed(RuntimeError):
    """A stage's tool exited with an error; its log says why."""


class RunDirMismatch(ValueError):
    """``--run-dir`` holds a run of another preset or mode."""


def _stages(value: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [part for part in chosen if part not in STAGES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"stages are a comma-separated subset of {','.join(STAGES)}")
    return tuple(stage for stage in STAGES if stage in chosen)


def _seed(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def _preset_values(attribute: str) -> str:
    return ", ".join(f"{name} {getattr(preset, attribute)}" for name, preset in PRESETS.items())


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragr1-verl-demo", description=__doc__.split("\n\n")[0],
        epilog="Other arguments are Hydra overrides for main_ppo, e.g. trainer.total_training_steps=5")
    parser.add_argument("--stages", type=_stages, default=STAGES,
                        help="comma-separated: sft (stage 1), rl (stage 2, from the SFT model when sft "
                             "runs too or --run-dir holds a finished stage 1), eval (the held-out questions, "
                             "every model of the run); 'rl' alone is the quick run")
    parser.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                        help="what the stages train with: "
                             + "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
                             + ". Explicit flags and overrides win over its values")
    add_setting_argument(parser, RagR1Config, "mode", choices=CHOICES["mode"])
    parser.add_argument("--algorithm", choices=sorted(RL_RECIPES), default=None,
                        help="ppo: PPO with a critic as the paper trains (recipe ragr1_cpu); grpo: "
                             f"ragr1_cpu_grpo (default: the preset's: {_preset_values('rl_algorithm')})")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help=f"RL training steps (default: the preset's: {_preset_values('rl_steps')}); the "
                             "held-out evaluation follows when eval is a stage, else verl validates on the "
                             "dev questions after the last step")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="the RL stage's seed (data.seed: the prompts' order; "
                             "actor_rollout_ref.rollout.seed: the sampling); its results go to "
                             "rl-seed<N>/, so another seed adds to a --run-dir")
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
                        help="where logs, metrics, checkpoints and results go (default: "
                             "./ragr1-cpu-runs/<time>); an earlier run's folder resumes it: finished stages "
                             "are skipped")
    parser.add_argument("--compare-modes", type=Path, nargs=2, metavar=("MQ_RUN", "SQ_RUN"), default=None,
                        help="print the mq vs sq table (the paper's Table 5) of two finished runs, one with "
                             "--mode mq and one with --mode sq, each its run folder or the folder's "
                             f"eval/{SUMMARY_FILE}, and exit: EM with the paired "
                             "difference, searches per question and their ratio, queries per search, seconds "
                             "per question, overall and per question type")
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
    eval_ids: frozenset[str] | None = None  # the held-out questions' ids the evaluation covers

    def path(self, *parts: str) -> Path:
        target = self.folder.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    # the preset's values where no flag was given

    @property
    def preset(self) -> Preset:
        return PRESETS[getattr(self.args, "preset", None) or DEFAULT_PRESET]

    @property
    def algorithm(self) -> str:
        return self.args.algorithm or self.preset.rl_algorithm

    @property
    def steps(self) -> int:
        return self.args.steps or self.preset.rl_steps

    @property
    def seed(self) -> int:
        return getattr(self.args, "seed", 0)

    @property
    def rl_label(self) -> str:
        """The RL stage's folder and evaluation label: one per seed."""
        return rl_label(self.seed)

    @property
    def sft_overrides(self) -> list[str]:
        return merge_overrides(self.preset.sft_overrides, self.args.sft_override)


def rl_label(seed: int) -> str:
    return f"rl-seed{seed}"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same clean-up path as Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    global _console_log
    signal.signal(signal.SIGTERM, _interrupt)
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parser.parse_known_args(argv)
    bad = [item for item in [*overrides, *args.sft_override] if "=" not in item]
    if bad:
        parser.error(f"unknown arguments {bad} (Hydra overrides look like key=value)")
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    if args.compare_modes:
        return compare_modes(*args.compare_modes)
    run = Run(_run_folder(args.run_dir), args, list(overrides))
    try:
        resumed = record_run(run, argv)
    except RunDirMismatch as mismatch:
        _out(str(mismatch), error=True)
        return 2
    _console_log = run.folder / CONSOLE_LOG
    started = time.monotonic()
    code = 0
    try:
        _progress(run, _invocation_header(run, argv, resumed))
        with _retriever(args.retriever_url) as url:
            run.retriever_url = url
            _run_stages(run)
    except StageFailed as failure:
        _out(str(failure), error=True)
        code = 1
    except KeyboardInterrupt:
        _out("interrupted", error=True)
        code = 130
    try:
        _print_summary(run, time.monotonic() - started, code)
    finally:
        _console_log = None
    return code


def _run_folder(requested: Path | None) -> Path:
    folder = requested or Path("ragr1-cpu-runs") / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve()


def _run_stages(run: Run) -> None:
    run.models["base"] = _base_model(run)
    if run.args.sft_model is not None:
        run.models["sft"] = run.args.sft_model.expanduser().resolve()
    elif "sft" not in run.args.stages and stage_done(run, "sft"):
        run.models["sft"] = sft_output(run.folder).resolve()  # this run folder's finished stage 1
    for stage, action in (("sft", _sft_stage), ("rl", _rl_stage), ("eval", _eval_stage)):
        if stage not in run.args.stages:
            continue
        name = run.rl_label if stage == "rl" else stage
        if stage != "eval" and stage_done(run, stage):  # the evaluation decides model by model
            _skip_stage(run, stage)
            continue
        if stage != "eval":
            _set_aside_incomplete(run.folder / ("sft" if stage == "sft" else run.rl_label))
        started = time.monotonic()
        _out(f"== stage {name} ==")
        try:
            result = action(run)
        except BaseException:
            _progress(run, f"- {name}: stopped after {time.monotonic() - started:,.0f} s (not finished)")
            raise
        run.seconds[name] = time.monotonic() - started
        _record_timing(run, name, run.seconds[name])
        budget = {"sft": run.preset.sft_budget_min, "rl": run.preset.rl_budget_min}.get(stage)
        _out(f"== stage {name} done in {run.seconds[name]:.0f} s{_budget(run.seconds[name], budget)} ==")
        if stage != "eval":  # the evaluation writes its rows and table itself, model by model
            _progress(run, f"- {name}: {run.seconds[name]:,.0f} s{_budget(run.seconds[name], budget)}"
                           + (f"; {result}" if isinstance(result, str) else ""))


# -- resuming: what is done ---------------------------------------------------------------------------------

def sft_output(folder: Path) -> Path:
    """Stage 1's kept model: ``sft/checkpoints/best/huggingface`` (written last, by ``mark_best``)."""
    return folder / "sft" / "checkpoints" / "best" / "huggingface"


def finished_rl(stage_folder: Path) -> Path | None:
    """The final actor of a finished RL stage folder (``rl-seed<N>``), or None: its Hugging Face folder holds
    weights and verl's ``latest_checkpointed_iteration.txt``, written once the checkpoint is saved, names its
    step (with ``save_freq`` past the last step, verl saves the final step only)."""
    from ragr1_verl.sft.checkpoints import has_hf_weights

    checkpoints = stage_folder / "checkpoints"
    try:
        actor = final_actor(checkpoints)
        latest = int((checkpoints / "latest_checkpointed_iteration.txt").read_text(encoding="utf-8").strip())
    except (StageFailed, OSError, ValueError):
        return None
    step = int(actor.parent.parent.name.rpartition("_")[2])
    return actor if step == latest and has_hf_weights(actor.parent) else None


def eval_done(out: Path, model: Path, limit: int | None, question_ids: frozenset[str]) -> bool:
    """Whether ``ragr1-eval --out out`` evaluated ``model`` (with ``limit``) on every one of
    ``question_ids``."""
    from ragr1_verl.evaluation.runner import RESULTS_FILE, read_result_lines
    from ragr1_verl.evaluation.runner import RUN_FILE as EVAL_RUN_FILE

    try:
        recorded = json.loads((out / EVAL_RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict):
        return False
    if (recorded.get("model"), recorded.get("limit")) != (str(model), limit):
        return False
    records, _ = read_result_lines(out / RESULTS_FILE)
    return question_ids <= {record["id"] for record in records}


def stage_done(run: Run, stage: str) -> bool:
    """Whether ``stage`` left its complete output in the run folder, so that a resumed run skips it: ``sft``
    (the kept model), ``rl`` (this seed's final actor) or ``eval/<label>`` (every held-out question of
    ``run.eval_ids`` evaluated with that label's model). Reads files only; runs nothing."""
    if stage == "sft":
        from ragr1_verl.sft.checkpoints import has_hf_weights

        return has_hf_weights(sft_output(run.folder).parent)
    if stage == "rl":
        return finished_rl(run.folder / run.rl_label) is not None
    kind, _, label = stage.partition("/")
    if kind == "eval" and label in run.models and run.eval_ids is not None:
        return eval_done(run.folder / "eval" / label, run.models[label], run.args.eval_limit, run.eval_ids)
    if kind == "eval":
        return False
    raise ValueError(f"unknown stage {stage!r}")


def finished_rl_models(folder: Path) -> dict[str, Path]:
    """Every finished RL seed in a run folder, by seed: label -> final actor."""
    seeds = []
    for candidate in folder.glob("rl-seed*"):
        suffix = candidate.name.removeprefix("rl-seed")
        if candidate.is_dir() and suffix.isdigit():
            seeds.append(int(suffix))
    found = {rl_label(seed): finished_rl(folder / rl_label(seed)) for seed in sorted(seeds)}
    return {label: actor for label, actor in found.items() if actor is not None}


def _skip_stage(run: Run, stage: str) -> None:
    """Take a finished stage's model from the run folder instead of training it again."""
    if stage == "sft":
        run.models["sft"] = sft_output(run.folder).resolve()
        _record_prompt(run.folder / "sft" / "checkpoints", run.args.mode)
        message = f"sft: already done ({_sft_result(run.folder / 'sft' / 'checkpoints')}), skipped"
    else:
        run.models[run.rl_label] = finished_rl(run.folder / run.rl_label)
        _record_prompt(run.folder / run.rl_label / "checkpoints", run.args.mode)
        message = f"{run.rl_label}: already done ({_rl_result(run)}), skipped"
    _out(f"== stage {message} ==")
    _progress(run, f"- {message}")


def _set_aside_incomplete(folder: Path) -> None:
    """An unfinished stage starts again in an empty folder; what the interrupted try left (its log, metrics
    and any checkpoint, which the trainers could not resume from) is kept as ``<folder>.incomplete``."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    aside = folder.with_name(f"{folder.name}.incomplete")
    if aside.exists():
        shutil.rmtree(aside)
    folder.rename(aside)
    _out(f"{folder.name}: an earlier try did not finish; its files moved to {aside.name}, starting again")


# -- the run's record: run.json, progress.md, demo.log ------------------------------------------------------

def run_settings(run: Run) -> dict[str, Any]:
    """What a command trains with, after the preset's values and the flags."""
    return {"preset": run.preset.name, "mode": run.args.mode, "algorithm": run.algorithm, "steps": run.steps,
            "seed": run.seed, "stages": list(run.args.stages), "overrides": list(run.overrides),
            "sft_overrides": run.sft_overrides,
            "model": None if run.args.model is None else str(run.args.model),
            "sft_model": None if run.args.sft_model is None else str(run.args.sft_model),
            "eval_limit": run.args.eval_limit}


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """The git commit (and whether tracked files differ from it) when this package is a git checkout's,
    else the installed package's version."""
    package = Path(__file__).resolve().parents[1]

    def git(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(package), *arguments], capture_output=True, text=True,
                              timeout=20, check=False)

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        # tracked, not merely inside a checkout (a virtual environment may live in one)
        if git("ls-files", "--error-unmatch", "demo/cli.py").returncode == 0:
            commit = git("rev-parse", "HEAD")
            if commit.returncode == 0:
                dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
                return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty)}
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"version": version("ragr1-verl")}
    except PackageNotFoundError:
        return {"version": "unknown"}


def record_run(run: Run, argv: Sequence[str]) -> bool:
    """Add this command to the run folder's ``run.json``; whether the folder held an earlier run. A folder
    whose run used another preset or mode is refused (:class:`RunDirMismatch`): its finished stages would be
    taken for this command's."""
    path = run.folder / RUN_FILE
    settings = run_settings(run)
    record: dict[str, Any] = {key: settings[key] for key in RUN_IDENTITY}
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise RunDirMismatch(f"{path}: not valid JSON ({error}); use another --run-dir") from None
        if not isinstance(record, dict):
            raise RunDirMismatch(f"{path}: not a run record; use another --run-dir")
        changed = [key for key in RUN_IDENTITY if record.get(key) != settings[key]]
        if changed:
            raise RunDirMismatch(
                f"{run.folder} holds a run with " + ", ".join(f"{key} {record.get(key)}" for key in changed)
                + "; this command asks for " + ", ".join(f"{key} {settings[key]}" for key in changed)
                + ": use another --run-dir (or the same preset and mode to resume it)")
        last = (record.get("invocations") or [{}])[-1].get("settings", {})
        differ = [key for key in ("algorithm", "steps", "overrides", "sft_overrides", "model", "eval_limit")
                  if key in last and last[key] != settings[key]]
        if differ:
            logger.warning("resuming %s with other %s than its last command: stages already done keep theirs",
                           run.folder, ", ".join(differ))
    resumed = bool(record.get("invocations"))
    record.setdefault("invocations", []).append({
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(argv), "settings": settings,
        "code": code_version()})
    _write_json(path, record)
    return resumed


def _write_json(path: Path, value: Any) -> None:
    """``path`` replaced whole (staged, then renamed): an interrupted write leaves the old file, not half."""
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(staged, path)


def _invocation_header(run: Run, argv: Sequence[str], resumed: bool) -> str:
    code = code_version()
    version = (f"git {code['git_commit'][:12]}" + (" (with local changes)" if code["git_dirty"] else "")
               if "git_commit" in code else f"version {code['version']}")
    return (f"\n## {time.strftime('%Y-%m-%d %H:%M:%S')} ragr1-verl-demo {' '.join(argv)}".rstrip()
            + f"\n\n{'resumed' if resumed else 'new run'}: preset {run.preset.name}, mode {run.args.mode}, "
            f"seed {run.seed}, {run.algorithm} {run.steps} steps, stages {','.join(run.args.stages)}; "
            f"code {version}\n")


def _progress(run: Run, text: str) -> None:
    """Append a line (or block) to the run's ``progress.md``."""
    with run.path(PROGRESS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(text + "\n")


def _record_timing(run: Run, stage: str, seconds: float) -> None:
    timings = _timings(run.folder)
    timings[stage] = round(seconds, 1)
    _write_json(run.folder / TIMINGS_FILE, timings)


def _timings(folder: Path) -> dict[str, float]:
    return _json_object(folder / TIMINGS_FILE)


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; empty when the file is missing, unreadable or holds something else."""
    with contextlib.suppress(OSError, ValueError):
        value = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(value, dict):
            return value
    return {}


def _budget(seconds: float, minutes: int | None) -> str:
    if minutes is None:
        return ""
    verdict = "within" if seconds <= 60 * minutes else "OVER"
    return f" ({verdict} the {minutes} min target)"


def _base_model(run: Run) -> Path:
    """The starting model: ``--model``, a ``model.path`` override, or SmolLM2 converted once into the cache."""
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
    return {**os.environ, "VERL_FILE_LOGGER_PATH": str(metrics_file), "WANDB_MODE": "disabled", CPU_BACKEND.name: "1"}


# -- stage 1: SFT -----------------------------------------------------------------------------------------

def sft_command(run: Run, checkpoints: Path, train_file: Path | None = None) -> list[str]:
    """verl's SFT trainer under torchrun (one CPU rank), the CPU SFT recipe, then the preset's overrides and
    the user's (which win); ``train_file`` replaces the recipe's demo training data."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", verl_compat.SFT_TRAINER_MODULE]
    overrides = [f"+recipe={SFT_RECIPES[run.args.mode]}",
                 f"trainer.default_local_dir={checkpoints}", "trainer.logger=[console,file]",
                 # the model only, as a Hugging Face folder: an unfinished stage starts again rather than
                 # resuming (the optimizer state is 1 GB an epoch)
                 "checkpoint.save_contents=[hf_model]"]
    if run.args.model is not None:
        overrides.append(f"model.path={run.models['base']}")
    if train_file is not None:
        overrides.append(f"data.train_files={train_file}")
    return command + merge_overrides(overrides, run.sft_overrides)


def sft_train_file(run: Run) -> Path | None:
    """The preset's weighted copy of the demo SFT training data (``sft/data/train.parquet``: the trajectories
    that search more than once repeated), or None where the recipe's file is used as it is: a preset without
    repeats, or training files of the user's own (``--sft-override data.train_files=...``)."""
    copies = run.preset.sft_multi_search_copies
    own_files = any(override_key(item) == "data.train_files" for item in run.args.sft_override)
    if copies == 1 or own_files:
        return None
    source = assets.ensure_demo_sft_data(run.args.mode) / "train.parquet"
    rows = read_records(source)
    weighted = repeat_multi_search(rows, copies, searches=lambda row: row["extra_info"]["searches"])
    target = run.path("sft", "data", "train.parquet")
    with staged_output(target.parent) as staging:
        write_sft_records(weighted, staging / target.name)
    _out(f"SFT data: {len(rows)} teacher trajectories, those that search more than once {copies} times: "
         f"{len(weighted)} rows ({target})")
    return target


def _sft_stage(run: Run) -> str:
    from ragr1_verl.sft.checkpoints import mark_best, select_best

    checkpoints, metrics = run.path("sft", "checkpoints"), run.path("sft", "metrics.jsonl")
    command = sft_command(run, checkpoints, sft_train_file(run))
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
    return _sft_result(checkpoints)


def _sft_result(checkpoints: Path) -> str:
    """The kept step and its validation loss, from ``best.json``."""
    from ragr1_verl.sft.checkpoints import SUMMARY_NAME, VAL_LOSS_KEY

    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        best = json.loads((checkpoints / SUMMARY_NAME).read_text(encoding="utf-8"))
        return f"kept step {best['step']}, validation loss {float(best[VAL_LOSS_KEY]):.4f}"
    return "kept model: see best.json"


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
    the final model go, the preset's overrides, the seed, then the user's overrides (which win)."""
    folder = run.folder / run.rl_label
    command = [sys.executable, "-m", verl_compat.MAIN_PPO_MODULE]
    overrides = [f"+recipe={RL_RECIPES[run.algorithm]}",
                 f"actor_rollout_ref.model.path={start_model}", f"ragr1.retriever.url={run.retriever_url}",
                 "trainer.logger=[console,file]", f"trainer.rollout_data_dir={folder / 'rollouts'}",
                 f"trainer.validation_data_dir={folder / 'validation'}",
                 f"trainer.default_local_dir={folder / 'checkpoints'}",
                 # only the final actor, as a Hugging Face folder for ragr1-eval
                 "trainer.save_freq=1000000", "actor_rollout_ref.actor.checkpoint.save_contents=[hf_model]",
                 "critic.checkpoint.save_contents=[]"]
    if run.args.mode == "sq":
        overrides += ["ragr1.mode=sq", "ragr1.prompt_template=sq"]
    # the eval stage measures every model on the held-out questions: no extra validation pass then
    test_freq = -1 if "eval" in run.args.stages else run.steps
    overrides += [*run.preset.rl_overrides,
                  # the seed: the prompts' order (verl's default: unseeded) and the rollout's sampling
                  f"data.seed={run.seed}", f"actor_rollout_ref.rollout.seed={run.seed}",
                  f"trainer.total_training_steps={run.steps}", f"trainer.test_freq={test_freq}"]
    user = [item for item in run.overrides if not item.startswith("actor_rollout_ref.model.path=")]
    return command + merge_overrides(overrides, user)


def _rl_stage(run: Run) -> str:
    start = run.models.get("sft", run.models["base"])
    label = run.rl_label
    metrics, log = run.path(label, "metrics.jsonl"), run.path(label, "train.log")
    logger.info("data: %s", assets.ensure_demo_data())
    command = rl_command(run, start)
    logger.info("RL (%s, seed %d, from %s): %s\n(full output in %s)", run.algorithm, run.seed, start,
                " ".join(command), log)
    _out(report.rl_header())

    def on_line(line: str) -> None:
        for marker, message in MILESTONES.items():
            if marker in line:
                logger.info("  ... %s", message)
        if "step:" in line:
            _print_new_rl_rows(run, metrics)

    code = run_logged(command, log=log, cwd=run.folder, env=_tool_env(metrics), on_line=on_line)
    _print_new_rl_rows(run, metrics)
    summary = validation_summary(read_metrics(metrics))
    if summary:
        _out(summary)
    if code:
        raise StageFailed(_failure("RL", code, log))
    run.models[label] = final_actor(run.folder / label / "checkpoints")
    _record_prompt(run.folder / label / "checkpoints", run.args.mode)
    return f"{_rl_result(run)}; {run.algorithm} from {start}"


def _rl_result(run: Run) -> str:
    """Steps run and the mean train reward over the first and the last 5 of them."""
    metrics = read_metrics(run.folder / run.rl_label / "metrics.jsonl")
    steps = [step for step, values in metrics.items() if "timing_s/step" in values]
    first, last = report.reward_window_means(metrics, window=5)

    def mean(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return f"{len(steps)} steps; mean train reward: first 5 steps {mean(first)}, last 5 steps {mean(last)}"


def _record_prompt(checkpoints: Path, mode: str) -> None:
    """The prompt the stage trained with (the mode's built-in one, as the demo data and recipes use), beside
    its checkpoints, for ragr1-eval's check."""
    from ragr1_verl.protocol.prompts import PromptRecord, default_template

    PromptRecord(default_template(mode), f"ragr1-verl-demo: the built-in {mode} prompt").write(checkpoints)


def _print_new_rl_rows(run: Run, metrics: Path) -> None:
    """One row per finished step, with the running mean of the reward up to it."""
    steps = read_metrics(metrics)
    for step, values in sorted(steps.items()):
        if step not in run.printed_steps and "timing_s/step" in values:
            run.printed_steps.add(step)
            _out(report.format_rl_row_with_history(step, steps))


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

    overrides = [f"+recipe={RL_RECIPES[run.algorithm]}",
                 *[item for item in run.overrides if item.startswith(("ragr1.", "data.max_"))]]
    if run.args.mode == "sq":
        overrides += ["ragr1.mode=sq", "ragr1.prompt_template=sq"]
    with initialize_config_module(verl_compat.CONFIG_MODULE, version_base=None):
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
    """Every model of the run (those of earlier seeds in the same folder too), one after the other; a model
    whose evaluation is complete is not evaluated again, and an incomplete one starts again (``--overwrite``:
    ragr1-eval resumes only with the same retriever address, and the demo retriever's port changes)."""
    from ragr1_verl.evaluation.runner import load_questions

    data = assets.ensure_demo_data() / "test.parquet"
    settings = rollout_settings(run)
    run.eval_ids = frozenset(question.id for question in load_questions([data], run.args.eval_limit))
    for label, model in finished_rl_models(run.folder).items():
        run.models.setdefault(label, model)
    run.models = dict(sorted(run.models.items(), key=lambda item: _label_order(item[0])))
    rows: list[report.EvalRow] = []
    evaluations: dict[str, ModelEvaluation] = {}
    types = question_types()
    timings = _timings(run.folder)
    settings_record = _json_object(run.folder / RUN_FILE)
    for label, model in run.models.items():
        stage = f"eval/{label}"
        done = stage_done(run, stage)
        if done:
            seconds = float(timings.get(stage, 0.0))
            records = read_results(run.folder / "eval" / label)
            _out(f"evaluated {label}: already done ({len(records)} held-out questions in eval/{label}), "
                 "skipped")
        else:
            started = time.monotonic()
            code = run_logged(eval_command(run, label, model, data, settings),
                              log=run.path("eval", f"{label}.log"), cwd=run.folder, env=dict(os.environ))
            if code:
                raise StageFailed(_failure(f"evaluation of {label}", code, run.path("eval", f"{label}.log")))
            seconds = time.monotonic() - started
            _record_timing(run, stage, seconds)
            records = read_results(run.folder / "eval" / label)
            _out(f"evaluated {label}: {len(records)} held-out questions in {seconds:.0f} s")
        new_rows = report.eval_rows(label, records, seconds, types)
        rows += new_rows
        evaluations[label] = ModelEvaluation(tuple(records), seconds)
        write_summary(run.path("eval", SUMMARY_FILE), RunSummary(settings_record, evaluations))
        overall = next(row for row in new_rows if row.group == "all") if new_rows else None
        if overall is not None:
            _progress(run, f"- eval {label}: {'already done: ' if done else ''}{overall.questions} "
                           f"questions, EM {overall.em:.3f}, F1 {overall.f1:.3f}, "
                           f"protocol {100 * overall.protocol:.0f}% ({seconds:,.0f} s)")
        table = eval_table(rows)
        run.path("eval", "table.txt").write_text(table + "\n", encoding="utf-8")  # the table as it goes
    _out("\n" + table)
    _progress(run, "\n```\n" + table + "\n```\n")


def compare_modes(mq_run: Path, sq_run: Path) -> int:
    """``--compare-modes``: the two runs' evaluations side by side (:func:`report.modes_table`); each run is
    its folder or the folder's ``eval/summary.json``."""
    rows = {}
    for mode, source in (("mq", mq_run), ("sq", sq_run)):
        try:
            recorded, rows[mode] = run_mode(source), eval_rows_of(source)
        except SummaryError as error:
            _out(str(error), error=True)
            return 2
        if recorded != mode:
            where = source if source.is_file() else source / RUN_FILE
            _out(f"{where}: this run's mode is {recorded or 'not recorded'}, expected {mode} "
                 "(--compare-modes MQ_RUN SQ_RUN)", error=True)
            return 2
        if not rows[mode]:
            _out(f"{source}: no evaluation " + ("in it" if source.is_file() else f"under {source / 'eval'}"),
                 error=True)
            return 2
    table = report.modes_table(rows["mq"], rows["sq"])
    _out(f"mq: {mq_run}\nsq: {sq_run}\n\n{table}")
    return 0


def run_mode(source: Path) -> str | None:
    """The ``mode`` a run records (None when it has none): in its folder's ``run.json`` or, for a summary file,
    in the copy of it there."""
    run = read_summary(source).run if source.is_file() else _json_object(source / RUN_FILE)
    mode = run.get("mode")
    return mode if isinstance(mode, str) else None


def eval_rows_of(source: Path) -> list[report.EvalRow]:
    """The table rows of every model evaluated in a run: its folder or its summary file."""
    models = read_summary(source).models if source.is_file() else folder_evaluations(source)
    types = question_types()
    return [row for label in sorted(models, key=_label_order)
            for row in report.eval_rows(label, models[label].records, models[label].seconds, types)]


def folder_evaluations(folder: Path) -> dict[str, ModelEvaluation]:
    """Every model evaluated in a run folder (``eval/<label>/results.jsonl``), with the evaluation's wall time
    from the folder's timings (0 where it is not recorded)."""
    timings = _timings(folder)
    return {path.parent.name: ModelEvaluation(tuple(read_results(path.parent)),
                                              float(timings.get(f"eval/{path.parent.name}", 0.0)))
            for path in (folder / "eval").glob("*/results.jsonl")}


def comparisons(labels: Sequence[str]) -> list[tuple[str, str]]:
    """(before, after) pairs of the table's EM differences: sft against base, and each RL seed against the
    model it started from (:func:`rl_start`); seeds are not compared with each other."""
    pairs = [("base", "sft")] if "base" in labels and "sft" in labels else []
    start = rl_start(labels)
    return pairs + [(start, label) for label in rl_seeds(labels) if start in labels]


def rl_start(labels: Sequence[str]) -> str:
    """The model the RL seeds started from: sft, or base without stage 1."""
    return "sft" if "sft" in labels else "base"


def rl_seeds(labels: Sequence[str]) -> list[str]:
    return [label for label in labels if label.startswith("rl-seed")]


def eval_table(rows: Sequence[report.EvalRow]) -> str:
    """:func:`report.eval_table`, its EM differences taken over :func:`comparisons` (where it has them), and,
    with several RL seeds, their difference pooled over the seeds."""
    labels = list(dict.fromkeys(row.label for row in rows))
    differences = [difference for before, after in comparisons(labels)
                   for difference in report.difference_rows([row for row in rows if row.label in (before, after)])]
    seeds, start = rl_seeds(labels), rl_start(labels)
    if len(seeds) > 1 and start in labels:
        differences += report.pooled_difference_rows(rows, seeds, start)
    differences.sort(key=lambda difference: difference.group != "all")  # all questions first, as the models
    return report.eval_table(rows, differences)


def _label_order(label: str) -> tuple[int, int, str]:
    """base, sft, then the RL seeds by number, then anything else."""
    if label in ("base", "sft"):
        return (0 if label == "base" else 1, 0, label)
    suffix = label.removeprefix("rl-seed")
    return (2, int(suffix), label) if label.startswith("rl-seed") and suffix.isdigit() else (3, 0, label)


def question_types() -> dict[str, str]:
    """Question text -> ``single-hop``, ``bridge`` or ``comparison``, from the demo question file."""
    from retriever_server.demo import load_demo_questions

    return {q["question"]: q.get("hops") or q["type"] for q in load_demo_questions()}


# -- output -------------------------------------------------------------------------------------------------

def _failure(stage: str, code: int, log: Path) -> str:
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    return f"{stage} failed (exit code {code}); last lines of {log}:\n" + "\n".join(lines[-40:])


_console_log: Path | None = None  # the run's demo.log while main runs


def _out(text: str, error: bool = False) -> None:
    """The launcher's console output (the tables are for people; the tools' logs stay in their files), also
    appended to the run's ``demo.log``."""
    print(text, file=sys.stderr if error else sys.stdout, flush=True)
    if _console_log is not None:
        with contextlib.suppress(OSError), _console_log.open("a", encoding="utf-8") as handle:
            handle.write(text + "\n")


def _print_summary(run: Run, elapsed: float, code: int = 0) -> None:
    plot = report.write_plot(run.folder / "training.png", read_metrics(run.folder / "sft" / "metrics.jsonl"),
                             read_metrics(run.folder / run.rl_label / "metrics.jsonl"))
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in run.seconds.items())
    budget = _budget(elapsed, run.preset.run_budget_min) if run.args.stages == STAGES else ""
    _out(f"done in {elapsed:.0f} s{budget} ({stages or 'no stage run'}); logs, metrics, models and results "
         f"in {run.folder}" + (f"; plot: {plot}" if plot else ""))
    ending = "finished" if code == 0 else f"stopped (exit code {code})"
    _progress(run, f"- {ending} after {elapsed:,.0f} s{budget if code == 0 else ''} "
                   f"({stages or 'no stage run'})")


if __name__ == "__main__":
    sys.exit(main())
