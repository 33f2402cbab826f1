"""The ``ragr1/...`` training-step means: their aggregation, the hook on verl's v1 trainer, and its install in a
fresh process through the plugin entry point."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ragr1_verl import metrics
from ragr1_verl.agent_loop import TrajectoryStats
from ragr1_verl.reward import compute_score

REPO_ROOT = Path(__file__).resolve().parents[2]


def trajectory(searches=0, queries=0, answered=False, retrieval_s=0.0, reward=None, **counters):
    fields = TrajectoryStats(searches=searches, queries=queries, answered=answered, retrieval_s=retrieval_s,
                             **counters).as_extra_fields()
    if reward is not None:
        fields["reward_extra_info"] = reward
    return fields


def reward(acc, f1):
    return {"score": acc, "acc": acc, "f1": f1, "substring_em": acc, "format_ok": 1.0, "answered": 1.0,
            "searches": 0.0}


def test_the_means_over_trajectories_and_queries_per_search_over_searches():
    means = metrics.aggregate([
        trajectory(searches=2, queries=5, answered=True, retrieval_s=0.5, turns=3, reward=reward(1.0, 1.0)),
        trajectory(searches=0, queries=0, answered=True, turns=1, reward=reward(0.0, 0.5)),
        trajectory(searches=1, queries=1, answered=False, retrieval_s=0.25, turns=5, budget_hit=True,
                   invalid_actions=2, reward=reward(0.0, 0.0)),
        trajectory(searches=0, queries=0, answered=False, truncated=True, turns=2, reward=reward(0.0, 0.0)),
    ])
    assert means["ragr1/trajectories"] == 4
    assert means["ragr1/searches_per_trajectory"] == pytest.approx(3 / 4)
    # 6 queries in 3 searches: the trajectories without a search do not count (a mean over trajectories of
    # the per-trajectory ratio would give (2.5 + 0 + 1 + 0) / 4)
    assert means["ragr1/queries_per_search"] == pytest.approx(2.0)
    assert means["ragr1/turns_per_trajectory"] == pytest.approx(11 / 4)
    assert means["ragr1/retrieval_s_per_trajectory"] == pytest.approx(0.75 / 4)
    assert means["ragr1/invalid_actions_per_trajectory"] == pytest.approx(0.5)
    assert means["ragr1/answered"] == pytest.approx(0.5)
    assert means["ragr1/budget_hit"] == pytest.approx(0.25)
    assert means["ragr1/truncated"] == pytest.approx(0.25)
    assert means["ragr1/em"] == pytest.approx(0.25)
    assert means["ragr1/f1"] == pytest.approx(1.5 / 4)
    assert means["ragr1/format_ok"] == 1.0
    assert set(means) == {metric.key for metric in metrics.METRICS}
    assert all(type(value) is float for value in means.values())  # JSON- and wandb-ready


def test_a_step_without_searches_has_no_queries_per_search():
    means = metrics.aggregate([trajectory(answered=True), trajectory()])
    assert "ragr1/queries_per_search" not in means
    assert means["ragr1/searches_per_trajectory"] == 0.0 and means["ragr1/answered"] == 0.5


def test_only_our_trajectories_and_our_rewards_are_averaged():
    foreign = {"turns": 7, "reward_extra_info": {"acc": 1.0}}  # another agent loop, another reward function
    means = metrics.aggregate([foreign, trajectory(searches=1, queries=3, reward=reward(0.0, 0.0))])
    assert means["ragr1/trajectories"] == 1 and means["ragr1/searches_per_trajectory"] == 1.0
    assert means["ragr1/em"] == 0.0
    assert metrics.aggregate([foreign]) == {}
    assert metrics.aggregate([]) == {}
    # our reward without our rollout (verl's tool_agent with the search tool): reward means only
    only_reward = metrics.aggregate([{"reward_extra_info": reward(1.0, 0.5)}])
    assert only_reward == {"ragr1/em": 1.0, "ragr1/f1": 0.5, "ragr1/substring_em": 1.0, "ragr1/format_ok": 1.0}


def test_values_as_they_come_back_from_transfer_queue():
    """numpy scalars, and dicts wrapped in tensordict's NonTensorData (``.data``)."""
    wrapped = types.SimpleNamespace(data={"ragr1/searches": np.int64(2), "ragr1/queries": np.int64(3),
                                          "ragr1/answered": np.bool_(True), "ragr1/retrieval_ms": np.float32(500),
                                          "reward_extra_info": {**reward(1.0, 1.0), "acc": np.float64(1.0)}})
    means = metrics.aggregate([wrapped])
    assert means["ragr1/queries_per_search"] == 1.5 and means["ragr1/answered"] == 1.0
    assert means["ragr1/retrieval_s_per_trajectory"] == pytest.approx(0.5) and means["ragr1/em"] == 1.0


def test_every_field_read_is_one_the_rollout_or_the_reward_produces():
    rollout_fields = set(TrajectoryStats().as_extra_fields())
    reward_fields = set(compute_score("nq", "<answer> x </answer>", ["x"]))
    for metric in metrics.METRICS:
        assert metric.key.startswith("ragr1/")
        if metric.kind in ("rollout", "ratio"):
            assert {metric.field, metric.per or metric.field} <= rollout_fields, metric
        elif metric.kind == "reward":
            assert metric.field in reward_fields, metric
    assert metrics.ROLLOUT_MARKER in rollout_fields and set(metrics.REWARD_MARKERS) <= reward_fields
    assert len(set(metrics.KEYS)) == len(metrics.KEYS)


def test_the_metrics_reference_documents_every_key():
    page = (REPO_ROOT / "docs" / "reference" / "metrics.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(ragr1/[a-z_0-9]+)` \|", page, flags=re.MULTILINE))
    assert documented == set(metrics.KEYS)


# -- the hook ---------------------------------------------------------------------------------------------

def fake_trainer_module(compute_metrics):
    trainer = type("PPOTrainer", (), {"_compute_metrics": compute_metrics})
    return types.SimpleNamespace(PPOTrainer=trainer)


def test_the_hook_adds_the_means_of_the_real_trajectories_to_the_step_metrics(monkeypatch):
    calls = []

    def compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        metrics["critic/score/mean"] = 0.5
        calls.append(global_steps)

    stored = {"k0": trajectory(searches=2, queries=4), "k1": trajectory(searches=0),
              "pad": trajectory(searches=9, queries=9)}
    requests = []

    def kv_batch_get(keys, partition_id, select_fields):
        requests.append((list(keys), partition_id, select_fields))
        return {"extra_fields": [stored[key] for key in keys]}

    monkeypatch.setitem(sys.modules, "transfer_queue", types.SimpleNamespace(kv_batch_get=kv_batch_get))
    module = fake_trainer_module(compute_metrics)
    metrics.patch_trainer(module)
    metrics.patch_trainer(module)  # twice: wrapped once
    batch = types.SimpleNamespace(keys=["k0", "k1", "pad"], partition_id="train",
                                  tags=[{}, {"status": "success"}, {"is_padding": True}])
    step_metrics = {}
    module.PPOTrainer()._compute_metrics(batch, step_metrics, {}, global_steps=3, epoch=0)

    assert calls == [3]
    assert requests == [(["k0", "k1"], "train", ["extra_fields"])]  # verl's padding copies left out
    assert step_metrics["critic/score/mean"] == 0.5
    assert step_metrics["ragr1/searches_per_trajectory"] == 1.0 and step_metrics["ragr1/queries_per_search"] == 2.0


def scored(score):
    return trajectory(searches=1, queries=1, reward=reward(score, score))


def test_group_statistics_count_the_groups_whose_rewards_differ():
    stats = metrics.group_statistics({
        "a": [scored(1.0), scored(0.0), scored(0.0), scored(1.0)],  # signal, std 0.5
        "b": [scored(0.0)] * 4,                                    # all 0: advantage 0 for every one
        "c": [scored(1.0)] * 4,                                    # all 1: the same
        "d": [scored(1.0)],                                        # one trajectory: not a group
    })
    assert stats == {"ragr1/groups": 3.0, "ragr1/groups_with_signal": pytest.approx(1 / 3),
                     "ragr1/group_reward_std": pytest.approx(0.5 / 3)}
    assert set(stats) == set(metrics.GROUP_KEYS)
    assert metrics.group_statistics({"a": [scored(1.0)], "b": [scored(0.0)]}) == {}  # n = 1
    assert metrics.group_statistics({"a": [trajectory(), trajectory()]}) == {}  # nothing scored


def test_the_hook_groups_trajectories_by_verls_prompt_uid(monkeypatch):
    """v1 keys are ``{uid}_{session}_{index}``: the trajectories of one sampled prompt share the uid."""
    stored = {"u1_s1_0": scored(1.0), "u1_s2_0": scored(0.0), "u2_s3_0": scored(0.0), "u2_s4_0": scored(0.0)}

    def kv_batch_get(keys, partition_id, select_fields):
        return {"extra_fields": [stored[key] for key in keys]}

    monkeypatch.setitem(sys.modules, "transfer_queue", types.SimpleNamespace(kv_batch_get=kv_batch_get))
    module = fake_trainer_module(lambda self, batch, metrics, timing_raw, global_steps, epoch: None)
    metrics.patch_trainer(module)
    step_metrics = {}
    batch = types.SimpleNamespace(keys=list(stored), partition_id="train", tags=[{}] * 4)
    module.PPOTrainer()._compute_metrics(batch, step_metrics, {}, 1, 0)
    assert step_metrics["ragr1/groups"] == 2.0 and step_metrics["ragr1/groups_with_signal"] == 0.5
    assert step_metrics["ragr1/em"] == 0.25


def test_a_failing_metric_does_not_stop_the_step(monkeypatch, caplog):
    def kv_batch_get(**_):
        raise KeyError("extra_fields")

    monkeypatch.setitem(sys.modules, "transfer_queue", types.SimpleNamespace(kv_batch_get=kv_batch_get))
    module = fake_trainer_module(lambda self, batch, metrics, timing_raw, global_steps, epoch: None)
    metrics.patch_trainer(module)
    step_metrics = {}
    module.PPOTrainer()._compute_metrics(types.SimpleNamespace(keys=["k"], tags=[{}], partition_id="train"),
                                         step_metrics, {}, 1, 0)
    assert step_metrics == {} and "could not be computed" in caplog.text


def test_a_changed_verl_is_refused():
    with pytest.raises(metrics.VerlMetricsHookChanged):
        metrics.patch_trainer(fake_trainer_module(lambda self, batch, metrics: None))
    with pytest.raises(metrics.VerlMetricsHookChanged):
        metrics.patch_trainer(types.SimpleNamespace())


FRESH_PROCESS = """
import json
from verl.trainer.ppo.v1 import trainer_base
method = trainer_base.PPOTrainer._compute_metrics
print(json.dumps({"patched": getattr(method, "_ragr1_metrics", False),
                  "original": getattr(getattr(method, "_ragr1_original", None), "__module__", None)}))
"""


@pytest.mark.parametrize("plugins, patched", [("auto", True), ("none", False)])
def test_the_entry_point_hooks_verls_real_trainer_in_a_fresh_process(plugins, patched):
    environment = dict(os.environ, VERL_USE_EXTERNAL_PLUGINS=plugins)
    environment.pop("RAGR1_CPU_BACKEND", None)  # the metrics hook does not depend on the CPU backend
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS], cwd=REPO_ROOT, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"patched": patched, "original": "verl.trainer.ppo.v1.trainer_base" if patched else None}
