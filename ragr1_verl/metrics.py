"""RAG-R1's own means in verl's per-step training metrics (``ragr1/...``), from the rollout's and the reward's
own counters.

Each trajectory of :class:`~ragr1_verl.agent_loop.RagR1AgentLoop` carries ``ragr1/<counter>`` values in its
``AgentLoopOutput.extra_fields``, and verl's reward loop adds the reward function's dict under
``extra_fields["reward_extra_info"]``. verl 0.9 logs neither in the training-step metrics: its v1 trainer
(the default of ``main_ppo``) builds them in ``PPOTrainer._compute_metrics`` from fixed fields only, and it has
no public hook for more. So :func:`install` wraps that method (after the module is imported, checking first
that it still looks as in verl 0.9.x) to read the step's ``extra_fields`` from TransferQueue and add
:func:`aggregate`'s means. It is the only place that touches verl; the aggregation itself is plain Python.

Every key is named once, in :data:`METRICS` and :data:`GROUP_KEYS`; ``docs/reference/metrics.md`` documents them.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from numbers import Real
from types import ModuleType
from typing import Any

from ragr1_verl import verl_compat

logger = logging.getLogger(__name__)

_COMPUTE_METRICS_PARAMETERS = ["self", "batch", "metrics", "timing_raw", "global_steps", "epoch"]
# A trajectory counts as one of our rollout's when its extra fields hold this counter.
ROLLOUT_MARKER = "ragr1/searches"
# The reward's dict (ragr1_verl.reward.compute_score) is recognised by these keys together.
REWARD_MARKERS = ("acc", "f1", "substring_em", "format_ok")


@dataclass(frozen=True)
class Metric:
    """One logged mean: ``key`` in the metrics, ``field`` the per-trajectory value it averages.

    ``kind``: ``rollout`` (mean of ``extra_fields[field]`` over our rollout's trajectories), ``reward`` (mean of
    ``reward_extra_info[field]`` over the trajectories our reward scored), ``ratio`` (sum of ``field`` over the
    sum of ``per``, absent when that is 0) or ``count`` (how many of our rollout's trajectories the step has).
    """

    key: str
    kind: str
    field: str = ""
    per: str = ""
    scale: float = 1.0


METRICS: tuple[Metric, ...] = (
    Metric("ragr1/trajectories", "count"),
    Metric("ragr1/turns_per_trajectory", "rollout", "ragr1/turns"),
    Metric("ragr1/searches_per_trajectory", "rollout", "ragr1/searches"),
    Metric("ragr1/queries_per_search", "ratio", "ragr1/queries", per="ragr1/searches"),
    Metric("ragr1/duplicates_removed_per_trajectory", "rollout", "ragr1/duplicates_removed"),
    Metric("ragr1/queries_dropped_per_trajectory", "rollout", "ragr1/queries_dropped"),
    Metric("ragr1/invalid_actions_per_trajectory", "rollout", "ragr1/invalid_actions"),
    Metric("ragr1/retrieval_failures_per_trajectory", "rollout", "ragr1/retrieval_failures"),
    Metric("ragr1/retrieval_s_per_trajectory", "rollout", "ragr1/retrieval_ms", scale=1e-3),
    Metric("ragr1/trimmed_tokens_per_trajectory", "rollout", "ragr1/trimmed_tokens"),
    Metric("ragr1/answered", "rollout", "ragr1/answered"),
    Metric("ragr1/budget_hit", "rollout", "ragr1/budget_hit"),
    Metric("ragr1/truncated", "rollout", "ragr1/truncated"),
    Metric("ragr1/em", "reward", "acc"),
    Metric("ragr1/f1", "reward", "f1"),
    Metric("ragr1/substring_em", "reward", "substring_em"),
    Metric("ragr1/format_ok", "reward", "format_ok"),
)
# Group statistics of a step whose prompts were sampled several times (GRPO's groups, verl's rollout.n > 1):
# a group whose trajectories all got the same reward gives every one of them advantage 0, so the share of
# groups with different rewards is the share of the batch that teaches the policy anything.
GROUP_KEYS: tuple[str, ...] = ("ragr1/groups", "ragr1/groups_with_signal", "ragr1/group_reward_std")
KEYS: tuple[str, ...] = tuple(metric.key for metric in METRICS) + GROUP_KEYS


def _number(value: Any) -> float | None:
    """A float from an int, float, bool or numpy/torch scalar; None for anything else (None, strings)."""
    if type(value).__name__ == "NonTensorData":  # tensordict's wrapper (numpy scalars have a .data too)
        value = value.data
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy and torch scalars
        value = value.item()
    if isinstance(value, (bool, Real)):
        return float(value)
    return None


def _mapping(value: Any) -> Mapping[str, Any]:
    """A dict, possibly inside tensordict's NonTensorData wrapper (``.data``); {} for anything else."""
    if not isinstance(value, Mapping):
        value = getattr(value, "data", None)
    return value if isinstance(value, Mapping) else {}


def aggregate(trajectories: Iterable[Any]) -> dict[str, float]:
    """The ``ragr1/...`` means of one step, from each trajectory's ``extra_fields``.

    Rollout means are over the trajectories our rollout produced (those with ``ragr1/searches``); queries per
    search is over searches (all queries / all searches), so trajectories without a search do not pull it
    down, and it is absent when the step has no search at all. Reward means are over the trajectories our
    reward scored (``reward_extra_info`` with ``acc``, ``f1``, ``substring_em`` and ``format_ok``). A key
    with no trajectory to average is left out; so is every key when none of the trajectories is ours.
    """
    rollout: list[Mapping[str, Any]] = []
    rewards: list[Mapping[str, Any]] = []
    for trajectory in trajectories:
        fields = _mapping(trajectory)
        if ROLLOUT_MARKER in fields:
            rollout.append(fields)
        reward = _mapping(fields.get("reward_extra_info"))
        if all(key in reward for key in REWARD_MARKERS):
            rewards.append(reward)
    if not rollout and not rewards:
        return {}
    means: dict[str, float] = {}
    for metric in METRICS:
        if metric.kind == "count":
            if rollout:
                means[metric.key] = float(len(rollout))
            continue
        if metric.kind == "ratio":
            pairs = [(_number(fields.get(metric.field)), _number(fields.get(metric.per))) for fields in rollout]
            pairs = [(total, count) for total, count in pairs if total is not None and count is not None]
            denominator = sum(count for _, count in pairs)
            if denominator > 0:
                means[metric.key] = sum(total for total, _ in pairs) / denominator
            continue
        source = rollout if metric.kind == "rollout" else rewards
        values = [value for fields in source if (value := _number(fields.get(metric.field))) is not None]
        if values:
            means[metric.key] = metric.scale * sum(values) / len(values)
    return means


def group_statistics(groups: Mapping[str, Iterable[Any]]) -> dict[str, float]:
    """``ragr1/groups`` (prompts with 2 or more scored trajectories), ``ragr1/groups_with_signal`` (the share of
    them whose rewards differ) and ``ragr1/group_reward_std`` (the mean over them of the rewards' population
    standard deviation), from each prompt's trajectories' ``extra_fields``. Empty when no prompt has two
    scored trajectories (n = 1: PPO with a critic, or validation)."""
    spreads = []
    for trajectories in groups.values():
        scores = [_number(_mapping(_mapping(fields).get("reward_extra_info")).get("score"))
                  for fields in trajectories]
        scores = [score for score in scores if score is not None]
        if len(scores) >= 2:
            mean = sum(scores) / len(scores)
            spreads.append((max(scores) > min(scores), (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5))
    if not spreads:
        return {}
    return {"ragr1/groups": float(len(spreads)),
            "ragr1/groups_with_signal": sum(differ for differ, _ in spreads) / len(spreads),
            "ragr1/group_reward_std": sum(std for _, std in spreads) / len(spreads)}


def prompt_of(key: str) -> str:
    """The prompt a v1 trajectory key belongs to: verl keys trajectories ``{uid}_{session}_{index}``, with
    one ``uid`` per sampled prompt (``trainer/ppo/v1/replay_buffer.py``)."""
    return key.split("_", 1)[0]


# -- verl: the v1 trainer's per-step metrics ------------------------------------------------------------------

def step_extra_fields(batch: Any) -> dict[str, Any]:
    """The ``extra_fields`` of a v1 step's real trajectories (verl's batch-padding copies left out) by their
    key, read from TransferQueue, where the step's data stays until after the metrics are logged."""
    import transfer_queue as tq

    keys = [key for key, tag in zip(batch.keys, batch.tags, strict=True)
            if not (isinstance(tag, Mapping) and tag.get("is_padding", False))]
    if not keys:
        return {}
    data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
    return dict(zip(keys, data["extra_fields"], strict=True))


def step_metrics(fields_by_key: Mapping[str, Any]) -> dict[str, float]:
    """:func:`aggregate`'s means and :func:`group_statistics` of one step's trajectories (by v1 key)."""
    groups: dict[str, list[Any]] = {}
    for key, fields in fields_by_key.items():
        groups.setdefault(prompt_of(str(key)), []).append(fields)
    return {**aggregate(fields_by_key.values()), **group_statistics(groups)}


class VerlMetricsHookChanged(RuntimeError):
    """The verl code the metrics hook wraps is not what it expects (an unsupported verl release)."""


def patch_trainer(trainer_base: ModuleType) -> None:
    """Wrap ``PPOTrainer._compute_metrics`` so that each training step's metrics get :func:`aggregate`'s means.

    The wrapper runs verl's method first and then adds the ``ragr1/`` keys; a failure there is logged and the
    step goes on (a metric must not stop a training run).
    """
    trainer = getattr(trainer_base, "PPOTrainer", None)
    original = getattr(trainer, verl_compat.COMPUTE_METRICS, None)
    if original is None or list(inspect.signature(original).parameters) != _COMPUTE_METRICS_PARAMETERS:
        raise VerlMetricsHookChanged(
            f"{verl_compat.TRAINER_BASE_MODULE}.PPOTrainer.{verl_compat.COMPUTE_METRICS}"
            f"{tuple(_COMPUTE_METRICS_PARAMETERS)} was not found; the ragr1/ training metrics support verl 0.9.x")
    if getattr(original, "_ragr1_metrics", False):
        return

    @functools.wraps(original)
    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        result = original(self, batch, metrics, timing_raw, global_steps, epoch)
        try:
            metrics.update(step_metrics(step_extra_fields(batch)))
        except Exception:
            logger.exception("ragr1: the ragr1/ metrics of step %s could not be computed", global_steps)
        return result

    _compute_metrics._ragr1_metrics = True
    _compute_metrics._ragr1_original = original
    setattr(trainer, verl_compat.COMPUTE_METRICS, _compute_metrics)


def _patch_or_warn(trainer_base: ModuleType) -> None:
    try:
        patch_trainer(trainer_base)
    except VerlMetricsHookChanged as error:  # training works without our metrics: say so, do not stop it
        logger.warning("%s", error)


def install() -> None:
    """Queue :func:`patch_trainer` on verl's v1 trainer module (at once if it is already imported)."""
    verl_compat.after_import(verl_compat.TRAINER_BASE_MODULE, _patch_or_warn)
