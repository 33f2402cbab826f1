"""Pick the stage-1 (SFT) checkpoint with the lowest validation loss, as the paper does.

verl 0.9's ``sft_trainer`` has no "keep the best checkpoint" option: it validates and saves at
``trainer.test_freq`` / ``trainer.save_freq`` and keeps only the last validation metric in memory. So
``+recipe=ragr1_sft`` validates and saves after every epoch, keeps every checkpoint, and logs ``val/loss``
through verl's ``file`` logger: one JSON object per line, ``{"step": N, "data": {"val/loss": x, ...}}``,
written to ``$VERL_FILE_LOGGER_PATH``, or to ``./<project_name>/<experiment_name>.jsonl`` without it. After
training, this module reads those logs, picks the ``global_step_N`` folder with the lowest validation loss
and points ``<checkpoint folder>/best`` at it (a relative symlink, or a copy with ``--copy``). ``best.json``
next to it says which step, which loss, and lists every candidate. Stage 2 then starts from
``<checkpoint folder>/best/huggingface``.

    python -m ragr1_verl.sft.checkpoints CHECKPOINT_DIR [--log FILE ...] [--copy] [--print-model-path]

``--print-model-path`` prints just the best checkpoint's Hugging Face model folder on stdout (the report goes
to stderr), for ``actor_rollout_ref.model.path=$(python -m ragr1_verl.sft.checkpoints CKPT --print-model-path)``.

Without ``--log``, every ``*.jsonl`` file directly inside CHECKPOINT_DIR is read, oldest first. verl's file
logger truncates its file when it starts, so give each (resumed) run its own file, e.g.
``VERL_FILE_LOGGER_PATH=$CKPT/val-$(date +%s).jsonl``; a later file wins for a step logged twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

VAL_LOSS_KEY = "val/loss"
BEST_NAME = "best"
SUMMARY_NAME = "best.json"
_STEP_FOLDER = re.compile(r"global_step_(\d+)")
_HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


class CheckpointSelectionError(RuntimeError):
    """No checkpoint can be chosen; the message says what is missing."""


@dataclass(frozen=True)
class BestCheckpoint:
    step: int
    val_loss: float
    path: Path
    candidates: dict[int, float] = field(default_factory=dict)  # step -> val/loss, every step with both


def read_val_losses(log_files: Iterable[str | os.PathLike]) -> dict[int, float]:
    """``step -> val/loss`` from verl file-logger JSONL files, read in the given order (later ones win).

    Lines without ``val/loss`` (training metrics) are skipped; a null or NaN loss (verl logs NaN when the
    validation loader yields no batch) is dropped. A line that is not a JSON object with ``step`` and ``data``
    is an error naming the file and line, except an unterminated last line (a run killed mid-write).
    """
    losses: dict[int, float] = {}
    for log_file in log_files:
        text = Path(log_file).read_text(encoding="utf-8")
        lines = text.split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step, data = record["step"], record["data"]
            except (ValueError, KeyError, TypeError) as err:
                if number == len(lines):  # no newline after it: an interrupted write
                    logger.warning("%s:%d: ignoring an incomplete last line", log_file, number)
                    continue
                raise CheckpointSelectionError(
                    f"{log_file}:{number}: not a verl file-logger record ({err})") from None
            if not isinstance(data, dict) or VAL_LOSS_KEY not in data:
                continue
            value = data[VAL_LOSS_KEY]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                losses[int(step)] = float(value)
            else:
                losses.pop(int(step), None)
                logger.warning("%s:%d: step %s has val/loss %r; it is not a candidate",
                               log_file, number, step, value)
    return losses


def checkpoint_folders(checkpoint_dir: str | os.PathLike) -> dict[int, Path]:
    """``step -> folder`` for every ``global_step_N`` folder verl saved in ``checkpoint_dir``."""
    folders = {}
    for child in Path(checkpoint_dir).iterdir():
        match = _STEP_FOLDER.fullmatch(child.name)
        if match and child.is_dir() and not child.is_symlink():
            folders[int(match.group(1))] = child
    return folders


def default_logs(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The ``*.jsonl`` files directly in ``checkpoint_dir``, oldest first."""
    return sorted(Path(checkpoint_dir).glob("*.jsonl"), key=lambda path: (path.stat().st_mtime, path.name))


def select_best(checkpoint_dir: str | os.PathLike, log_files: Sequence[str | os.PathLike]) -> BestCheckpoint:
    """The saved checkpoint with the lowest logged validation loss (the earliest step on a tie)."""
    folders = checkpoint_folders(checkpoint_dir)
    if not folders:
        raise CheckpointSelectionError(
            f"{checkpoint_dir} has no global_step_N folders (is it the run's trainer.default_local_dir?)")
    if not log_files:
        raise CheckpointSelectionError(
            f"no logs: pass --log FILE (verl's file logger writes $VERL_FILE_LOGGER_PATH, or "
            f"./<project_name>/<experiment_name>.jsonl from where training ran), or put the .jsonl files in "
            f"{checkpoint_dir}")
    losses = read_val_losses(log_files)
    candidates = {step: losses[step] for step in sorted(folders) if step in losses}
    if not candidates:
        raise CheckpointSelectionError(
            f"none of the saved steps {sorted(folders)} has a val/loss in {[str(f) for f in log_files]} "
            f"(logged steps: {sorted(losses)}); train with data.val_files set and 'file' in trainer.logger")
    step = min(candidates, key=lambda s: (candidates[s], s))
    return BestCheckpoint(step=step, val_loss=candidates[step], path=folders[step], candidates=candidates)


def mark_best(checkpoint_dir: str | os.PathLike, best: BestCheckpoint, *, copy: bool = False,
              log_files: Sequence[str | os.PathLike] = ()) -> Path:
    """Point ``<checkpoint_dir>/best`` at the chosen folder and write ``best.json``; returns ``best``.

    A relative symlink by default (the whole folder can be moved); ``copy=True`` copies the folder instead,
    for file systems or uploads without symlinks. An existing ``best`` is replaced.
    """
    root = Path(checkpoint_dir)
    target = root / BEST_NAME
    staging = root / f".{BEST_NAME}.tmp"
    _remove(staging)
    if copy:
        shutil.copytree(best.path, staging, symlinks=True)
    else:
        staging.symlink_to(best.path.name, target_is_directory=True)
    if not (staging.is_symlink() and target.is_symlink()):  # link over link is atomic; else clear the way
        _remove(target)
    os.replace(staging, target)
    summary = {
        "step": best.step,
        VAL_LOSS_KEY: best.val_loss,
        "folder": best.path.name,
        "mode": "copy" if copy else "symlink",
        "candidates": {str(step): loss for step, loss in best.candidates.items()},
        "logs": [str(Path(f).resolve()) for f in log_files],
    }
    (root / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return target


def has_hf_weights(checkpoint: str | os.PathLike) -> bool:
    """Whether ``<checkpoint>/huggingface`` holds model weights (saved when ``hf_model`` is in
    ``checkpoint.save_contents``)."""
    folder = Path(checkpoint, "huggingface")
    return any(any(folder.glob(pattern)) for pattern in _HF_WEIGHTS)


def hf_model_path(best: BestCheckpoint) -> Path:
    """The chosen checkpoint's Hugging Face model folder (absolute), what stage 2 loads as its model path.

    Raises :class:`CheckpointSelectionError` when it holds no weights (``hf_model`` was not saved) or only a
    LoRA adapter (a folder main_ppo cannot load as a model).
    """
    folder = (best.path / "huggingface").resolve()
    if not has_hf_weights(best.path):
        raise CheckpointSelectionError(
            f"{folder} has no model weights (hf_model was not in checkpoint.save_contents); merge them with: "
            f"python -m verl.model_merger merge --backend fsdp --local_dir {best.path} --target_dir <out>")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise CheckpointSelectionError(f"{folder} holds a LoRA adapter, not a model folder")
    wrapped = _peft_wrapped_key(folder)
    if wrapped:
        raise CheckpointSelectionError(
            f"{folder} holds an unmerged LoRA state dict (e.g. {wrapped}): verl 0.9.1 saves a LoRA run's "
            f"hf_model that way, and transformers would load it as random weights. Train without LoRA, or merge "
            f"the adapters into the base model first")
    return folder


def _peft_wrapped_key(folder: Path) -> str | None:
    """A tensor name of a PEFT-wrapped model (``base_model.model.*``, ``lora_A``) in the folder's safetensors
    files, or None. Only the files' headers are read."""
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with open(weights, "rb") as stream:
                size = int.from_bytes(stream.read(8), "little")
                header = json.loads(stream.read(size)) if 0 < size < 100_000_000 else {}
        except (OSError, ValueError):  # not a readable safetensors header: loading will say so
            continue
        for name in header:
            if name.startswith("base_model.model.") or ".lora_A." in name or ".lora_B." in name:
                return name
    return None


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ragr1_verl.sft.checkpoints",
        description="Link the SFT checkpoint with the lowest validation loss as CHECKPOINT_DIR/best.")
    parser.add_argument("checkpoint_dir", help="the SFT run's trainer.default_local_dir")
    parser.add_argument("--log", action="append", default=None, metavar="FILE",
                        help="a verl file-logger JSONL; repeatable, oldest first "
                             "(default: CHECKPOINT_DIR/*.jsonl)")
    parser.add_argument("--copy", action="store_true", help="copy the folder instead of a symlink")
    parser.add_argument("--print-model-path", action="store_true",
                        help="print only the best checkpoint's Hugging Face folder on stdout (the stage-2 "
                             "actor_rollout_ref.model.path); fail if it has no model weights")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logs = [Path(f) for f in args.log] if args.log else default_logs(args.checkpoint_dir)
    try:
        best = select_best(args.checkpoint_dir, logs)
    except (CheckpointSelectionError, OSError) as err:
        logger.error("error: %s", err)
        return 2
    target = mark_best(args.checkpoint_dir, best, copy=args.copy, log_files=logs)
    for step, loss in best.candidates.items():
        logger.info("  step %-8d val/loss %.6f%s", step, loss, "  <- best" if step == best.step else "")
    logger.info("best: %s -> %s", target, best.path.name)
    if args.print_model_path:
        try:
            print(hf_model_path(best))  # noqa: T201 - the path is this flag's output, for scripts
        except CheckpointSelectionError as err:
            logger.error("error: %s", err)
            return 2
        return 0
    if has_hf_weights(target):
        logger.info("stage-2 model path: %s", target / "huggingface")
    else:
        logger.warning("%s/huggingface has no weights (hf_model was not in checkpoint.save_contents); merge "
                       "them with: python -m verl.model_merger merge --backend fsdp --local_dir %s "
                       "--target_dir <out>", target, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
