"""``ragr1-verl-demo``'s presets, seeds and resuming, without training anything: the stages' processes are
stubbed (``run_logged`` writes what the real tool would leave behind); the decisions are the demo's own."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ragr1_verl.data.sft import write_sft_records
from ragr1_verl.demo import cli as demo
from ragr1_verl.demo import presets, report
from ragr1_verl.demo.summary import read_summary

QUICK_RL_BATCH_BEFORE_PRESETS = (  # the demo's RL batch before presets existed: quick must keep it
    "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "critic.ppo_mini_batch_size=2", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "critic.ppo_micro_batch_size_per_gpu=2")


def _run(folder: Path, argv=()):
    args, overrides = demo.make_parser().parse_known_args(list(argv))
    run = demo.Run(folder, args, list(overrides))
    run.retriever_url = "http://127.0.0.1:1/retrieve"
    run.models["base"] = folder / "base"
    return run


def _value(command, key):
    values = [item.partition("=")[2] for item in command if item.partition("=")[0] == key]
    assert len(values) <= 1, f"{key} given {len(values)} times"
    return values[0] if values else None


# -- presets ------------------------------------------------------------------------------------------------

def test_the_quick_preset_is_the_default_and_todays_demo(tmp_path):
    quick = presets.PRESETS["quick"]
    assert demo.make_parser().parse_args([]).preset == "quick" == presets.DEFAULT_PRESET
    assert (quick.sft_overrides, quick.rl_algorithm, quick.rl_steps) == ((), "ppo", 20)
    assert quick.rl_overrides == QUICK_RL_BATCH_BEFORE_PRESETS and quick.prompts_per_step == 2
    run = _run(tmp_path)
    rl = demo.rl_command(run, tmp_path / "sft")
    assert "+recipe=ragr1_cpu" in rl and _value(rl, "trainer.total_training_steps") == "20"
    assert set(QUICK_RL_BATCH_BEFORE_PRESETS) <= set(rl)
    sft = demo.sft_command(run, tmp_path / "ckpt")
    assert sft[-1] == "checkpoint.save_contents=[hf_model]"  # the recipe's own defaults: nothing added


def test_the_full_preset_reaches_both_commands(tmp_path):
    full = presets.PRESETS["full"]
    assert set(demo.make_parser()._option_string_actions["--preset"].choices) == set(presets.PRESETS)
    run = _run(tmp_path, ["--preset", "full"])
    sft = demo.sft_command(run, tmp_path / "ckpt")
    assert _value(sft, "data.train_max_samples") == "-1" and _value(sft, "trainer.total_epochs") == "2"
    rl = demo.rl_command(run, tmp_path / "sft")
    assert "+recipe=ragr1_cpu_grpo" in rl and _value(rl, "trainer.total_training_steps") == str(full.rl_steps)
    assert _value(rl, "data.train_batch_size") == "2" and _value(rl, "actor_rollout_ref.rollout.n") == "4"
    assert _value(rl, "actor_rollout_ref.actor.ppo_mini_batch_size") == "2"  # mini-batch = batch: one update
    assert _value(rl, "critic.ppo_mini_batch_size") is None  # quick's batch settings stay with quick
    assert run.algorithm == "grpo" and full.prompts_per_step == 2


def test_explicit_flags_and_overrides_win_over_the_preset(tmp_path):
    run = _run(tmp_path, ["--preset", "full", "--steps", "3", "--algorithm", "ppo",
                          "--sft-override", "trainer.total_epochs=1", "data.train_batch_size=8", "ragr1.topk=2"])
    sft = demo.sft_command(run, tmp_path / "ckpt")
    assert _value(sft, "trainer.total_epochs") == "1" and _value(sft, "data.train_max_samples") == "-1"
    assert sft[-1] == "trainer.total_epochs=1"
    rl = demo.rl_command(run, tmp_path / "sft")
    assert "+recipe=ragr1_cpu" in rl and _value(rl, "trainer.total_training_steps") == "3"
    assert _value(rl, "data.train_batch_size") == "8" and _value(rl, "actor_rollout_ref.rollout.n") == "4"
    assert rl[-2:] == ["data.train_batch_size=8", "ragr1.topk=2"]
    # a trailing override of a key the demo sets itself replaces it too (each key once)
    rl = demo.rl_command(_run(tmp_path, ["trainer.total_training_steps=7", "data.seed=9"]), tmp_path)
    assert _value(rl, "trainer.total_training_steps") == "7" and _value(rl, "data.seed") == "9"


def test_merge_overrides_keys_ignore_hydra_prefixes():
    merged = presets.merge_overrides(("a.b=1", "+c=2", "d=3"), ("++a.b=5", "c=4"))
    assert merged == ["d=3", "++a.b=5", "c=4"]


def test_the_preset_and_seed_overrides_compose_with_verls_configs(tmp_path):
    """Every key a preset or the seed sets exists in verl 0.9.1's configs (Hydra refuses unknown keys)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    run = _run(tmp_path, ["--preset", "full", "--seed", "3"])
    rl = demo.rl_command(run, tmp_path / "sft")
    ours = [item for item in rl if item.startswith(("data.", "actor_rollout_ref.rollout.", "+recipe"))
            and not item.startswith("actor_rollout_ref.model.path")]
    sft = [item for item in demo.sft_command(run, tmp_path / "ckpt")
           if item.startswith(("+recipe", "data.", "trainer.total_epochs"))]
    with initialize_config_module("verl.trainer.config", version_base=None):
        config = compose("ppo_trainer", overrides=ours)
        sft_config = compose("sft_trainer_engine", overrides=sft)
        quick = compose("ppo_trainer", overrides=["+recipe=ragr1_cpu", *presets.QUICK.rl_overrides])
        full = compose("ppo_trainer", overrides=[f"+recipe={demo.RL_RECIPES[presets.FULL.rl_algorithm]}",
                                                 *presets.FULL.rl_overrides])
    for item in presets.FULL.rl_overrides:  # every key of the preset is verl's, and takes the preset's value
        key, _, value = item.partition("=")
        assert str(OmegaConf.select(full, key)).lower() == value.lower(), item
    assert config.algorithm.adv_estimator == "grpo" and config.data.train_batch_size == presets.FULL.prompts_per_step
    assert config.actor_rollout_ref.rollout.n == 4 and config.data.seed == 3
    assert config.actor_rollout_ref.rollout.seed == 3
    assert sft_config.data.train_max_samples == -1 and sft_config.trainer.total_epochs == 2
    assert quick.data.train_batch_size == 2 and quick.critic.ppo_micro_batch_size_per_gpu == 2


# -- seeds ----------------------------------------------------------------------------------------------------

def test_each_seed_has_its_own_folder_and_label(tmp_path):
    run = _run(tmp_path, ["--seed", "3"])
    assert run.rl_label == "rl-seed3" and _run(tmp_path).rl_label == "rl-seed0"
    rl = demo.rl_command(run, tmp_path / "sft")
    assert _value(rl, "data.seed") == "3" and _value(rl, "actor_rollout_ref.rollout.seed") == "3"
    assert _value(rl, "trainer.default_local_dir") == str(tmp_path / "rl-seed3" / "checkpoints")
    assert _value(rl, "trainer.rollout_data_dir") == str(tmp_path / "rl-seed3" / "rollouts")
    with pytest.raises(SystemExit):
        demo.make_parser().parse_args(["--seed", "-1"])


# -- what is done -----------------------------------------------------------------------------------------

def _weights(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def _finish_rl(stage_folder: Path, step: int) -> Path:
    actor = _weights(stage_folder / "checkpoints" / f"global_step_{step}" / "actor" / "huggingface")
    (stage_folder / "checkpoints" / "latest_checkpointed_iteration.txt").write_text(str(step))
    return actor


def _finish_eval(out: Path, model: Path, ids, limit=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"model": str(model), "limit": limit}))
    lines = [json.dumps({"id": i, "question": f"{i}?", "em": 1.0, "f1": 1.0, "searches": 1, "queries": 2,
                         "format_ok": 1.0}) for i in ids]
    (out / "results.jsonl").write_text("".join(line + "\n" for line in lines))


def test_stage_done_reads_each_stages_complete_output(tmp_path):
    run = _run(tmp_path)
    assert not demo.stage_done(run, "sft") and not demo.stage_done(run, "rl")
    (tmp_path / "sft" / "checkpoints" / "global_step_2" / "huggingface").mkdir(parents=True)
    assert not demo.stage_done(run, "sft")  # trained, but no model kept yet (mark_best comes last)
    _weights(tmp_path / "sft" / "checkpoints" / "best" / "huggingface")
    assert demo.stage_done(run, "sft")

    actor = _weights(tmp_path / "rl-seed0" / "checkpoints" / "global_step_4" / "actor" / "huggingface")
    assert not demo.stage_done(run, "rl")  # verl writes latest_checkpointed_iteration.txt once it is saved
    _finish_rl(tmp_path / "rl-seed0", 4)
    assert demo.stage_done(run, "rl") and not demo.stage_done(_run(tmp_path, ["--seed", "1"]), "rl")
    assert demo.finished_rl_models(tmp_path) == {"rl-seed0": actor.resolve()}

    run.models["sft"] = tmp_path / "sft-model"
    run.eval_ids = frozenset({"q/0", "q/1", "q/2"})
    _finish_eval(tmp_path / "eval" / "sft", run.models["sft"], ["q/0", "q/1"])
    assert not demo.stage_done(run, "eval/sft")  # a question missing
    _finish_eval(tmp_path / "eval" / "sft", run.models["sft"], ["q/0", "q/1", "q/2"])
    assert demo.stage_done(run, "eval/sft") and not demo.stage_done(run, "eval/base")
    _finish_eval(tmp_path / "eval" / "sft", tmp_path / "another-model", ["q/0", "q/1", "q/2"])
    assert not demo.stage_done(run, "eval/sft")  # another model's results
    _finish_eval(tmp_path / "eval" / "sft", run.models["sft"], ["q/0", "q/1", "q/2"], limit=3)
    assert not demo.stage_done(run, "eval/sft")  # made with another --eval-limit


# -- resuming, with the stages' processes stubbed ----------------------------------------------------------

QUESTIONS = ["q/0", "q/1", "q/2"]


class FakeTools:
    """``run_logged`` that leaves what each real tool leaves behind, and records what was run."""

    def __init__(self):
        self.ran: list[str] = []
        self.commands: list[list[str]] = []

    def __call__(self, command, *, log, cwd, env, on_line=lambda line: None):
        self.commands.append(list(command))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("fake\n")
        module = command[command.index("-m", 3 if "torch.distributed.run" in command else 0) + 1]
        if module == "verl.trainer.sft_trainer":
            checkpoints = Path(_value(command, "trainer.default_local_dir"))
            _weights(checkpoints / "global_step_2" / "huggingface")
            Path(env["VERL_FILE_LOGGER_PATH"]).write_text(
                json.dumps({"step": 2, "data": {"train/loss": 1.0, "val/loss": 0.5}}) + "\n")
            self.ran.append("sft")
        elif module == "verl.trainer.main_ppo":
            checkpoints = Path(_value(command, "trainer.default_local_dir"))
            steps = int(_value(command, "trainer.total_training_steps"))
            lines = [json.dumps({"step": step, "data": {"critic/score/mean": step / steps, "timing_s/step": 1.0}})
                     for step in range(1, steps + 1)]
            Path(env["VERL_FILE_LOGGER_PATH"]).write_text("".join(line + "\n" for line in lines))
            on_line(f"step:{steps}")
            _finish_rl(checkpoints.parent, steps)
            self.ran.append(checkpoints.parent.name)
        elif module == "ragr1_verl.evaluation.cli":
            out, model = Path(command[command.index("--out") + 1]), command[command.index("--model") + 1]
            assert "--overwrite" in command  # an incomplete evaluation starts again
            _finish_eval(out, Path(model), QUESTIONS)
            self.ran.append(f"eval/{out.name}")
        else:
            raise AssertionError(f"unexpected command {shlex.join(command)}")
        return 0


SEARCHES = [1, 2, 1, 3]  # of the stand-in demo SFT trajectories


def _demo_sft_data(folder: Path) -> Path:
    """A stand-in for the demo's SFT data: four trajectories that search once, twice, once and three times."""
    if not (folder / "train.parquet").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rows = [{"data_source": "demo", "prompt": [{"role": "user", "content": f"q{index}?"}],
                 "trajectory": f"trajectory {index}", "question": f"q{index}?", "golden_answers": ["a"],
                 "extra_info": {"index": index, "split": "train", "id": f"demo/{index}", "origin": "sft-generate",
                                "searches": searches, "sample_kinds": []}}
                for index, searches in enumerate(SEARCHES)]
        write_sft_records(rows, folder / "train.parquet")
    return folder


@pytest.fixture
def tools(monkeypatch, tmp_path):
    from ragr1_verl.demo import assets
    from ragr1_verl.evaluation import runner

    if not hasattr(report, "format_rl_row_with_history"):  # another change adds them; until then, a shim
        monkeypatch.setattr(report, "format_rl_row_with_history",
                            lambda step, steps: report.format_rl_row(step, steps[step]), raising=False)
    if not hasattr(report, "reward_window_means"):
        def means(steps, window=5):
            rewards = [values["critic/score/mean"] for _, values in sorted(steps.items())]
            return ((sum(rewards[:window]) / len(rewards[:window]), sum(rewards[-window:]) / len(rewards[-window:]))
                    if rewards else (None, None))
        monkeypatch.setattr(report, "reward_window_means", means, raising=False)
    fake = FakeTools()
    monkeypatch.setattr(demo, "run_logged", fake)
    monkeypatch.setattr(demo, "_base_model", lambda run: tmp_path / "base")
    monkeypatch.setattr(demo, "rollout_settings", lambda run: {
        "ragr1": {"max_turns": 2, "topk": 1, "max_obs_tokens_per_query": 200, "max_tokens_per_turn": 96},
        "prompt": 640, "response": 640})
    monkeypatch.setattr(demo, "question_types", lambda: {})
    monkeypatch.setattr(assets, "ensure_demo_data", lambda: tmp_path / "data")
    monkeypatch.setattr(assets, "ensure_demo_sft_data", lambda mode="mq": _demo_sft_data(tmp_path / "sft-data"))
    monkeypatch.setattr(runner, "load_questions", lambda paths, limit=None: [
        type("Question", (), {"id": i})() for i in QUESTIONS[:limit]])
    return fake


def test_a_resumed_run_skips_done_stages_and_runs_the_missing_ones(tmp_path, tools, capsys):
    folder = tmp_path / "run"
    demo._run_stages(_run(folder, ["--preset", "full", "--steps", "6"]))
    assert tools.ran == ["sft", "rl-seed0", "eval/base", "eval/sft", "eval/rl-seed0"]

    tools.ran.clear()
    demo._run_stages(_run(folder, ["--preset", "full", "--steps", "6"]))  # all done: nothing runs again
    assert tools.ran == []
    out = capsys.readouterr().out
    assert "sft: already done (kept step 2, validation loss 0.5000), skipped" in out
    assert "rl-seed0: already done" in out and "evaluated rl-seed0: already done" in out

    # a second seed from the same run: only its RL and its evaluation run; the table has both seeds
    results = folder / "eval" / "sft" / "results.jsonl"
    results.write_text(results.read_text().splitlines()[0] + "\n")  # an interrupted evaluation of sft
    run = _run(folder, ["--preset", "full", "--steps", "6", "--seed", "1"])
    demo._run_stages(run)
    assert tools.ran == ["rl-seed1", "eval/sft", "eval/rl-seed1"]
    assert list(run.models) == ["base", "sft", "rl-seed0", "rl-seed1"]
    table = (folder / "eval" / "table.txt").read_text()
    assert all(any(line.split()[:1] == [label] for line in table.splitlines())
               for label in ("base", "sft", "rl-seed0", "rl-seed1"))
    # the small file to keep: every model's per-question scores, the run's settings, the evaluations' times
    summary = read_summary(folder / "eval" / "summary.json")
    assert list(summary.models) == ["base", "sft", "rl-seed0", "rl-seed1"]
    for label, evaluation in summary.models.items():
        assert [record["question"] for record in evaluation.records] == [f"{i}?" for i in QUESTIONS]
        assert evaluation.seconds == round(json.loads((folder / "timings.json").read_text())[f"eval/{label}"], 1)
    progress = (folder / "progress.md").read_text()
    assert "- sft: already done" in progress and "- rl-seed1:" in progress
    assert "mean train reward: first 5 steps 0.500, last 5 steps 0.667" in progress  # (1..5)/6, (2..6)/6


def _sft_train_file(tools) -> str | None:
    sft = next(command for command in tools.commands if "verl.trainer.sft_trainer" in command)
    return _value(sft, "data.train_files")


def test_the_full_preset_trains_stage_1_on_the_multi_search_trajectories_twice(tmp_path, tools):
    demo._run_stages(_run(tmp_path / "full", ["--preset", "full", "--stages", "sft"]))
    train_file = _sft_train_file(tools)
    assert train_file == str(tmp_path / "full" / "sft" / "data" / "train.parquet")
    rows = pq.read_table(train_file).to_pylist()
    assert sorted(row["extra_info"]["searches"] for row in rows) == [1, 1, 2, 2, 3, 3]
    assert rows[:len(SEARCHES)] == pq.read_table(tmp_path / "sft-data" / "train.parquet").to_pylist()

    tools.commands.clear()  # the quick preset trains on the recipe's file as it is
    demo._run_stages(_run(tmp_path / "quick", ["--stages", "sft"]))
    assert _sft_train_file(tools) is None and not (tmp_path / "quick" / "sft" / "data").exists()

    tools.commands.clear()  # training files of the user's own are used as they are
    own = "data.train_files=/data/own.parquet"
    demo._run_stages(_run(tmp_path / "own", ["--preset", "full", "--stages", "sft", "--sft-override", own]))
    assert _sft_train_file(tools) == "/data/own.parquet" and not (tmp_path / "own" / "sft" / "data").exists()


def test_main_records_the_run_and_resumes_it(tmp_path, tools, monkeypatch):
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(demo, "_retriever", lambda url: contextlib.nullcontext("http://127.0.0.1:1/retrieve"))
    folder = tmp_path / "run"
    argv = ["--preset", "full", "--run-dir", str(folder), "--steps", "2"]
    assert demo.main(argv) == 0
    assert tools.ran == ["sft", "rl-seed0", "eval/base", "eval/sft", "eval/rl-seed0"]
    tools.ran.clear()
    assert demo.main(argv) == 0 and tools.ran == []
    progress = (folder / "progress.md").read_text()
    assert "new run: preset full, mode mq, seed 0, grpo 2 steps" in progress
    assert "resumed: preset full" in progress and "- sft: already done" in progress
    assert progress.count("- finished after") == 2
    assert "rl-seed0: already done" in (folder / "demo.log").read_text()
    assert [entry["argv"] for entry in json.loads((folder / "run.json").read_text())["invocations"]] == [argv] * 2
    # the summary carries the run's settings as they stand after the second command
    assert read_summary(folder / "eval" / "summary.json").run == json.loads((folder / "run.json").read_text())


def test_an_unfinished_stage_starts_again_in_an_empty_folder(tmp_path, tools):
    folder = tmp_path / "run"
    (folder / "rl-seed0").mkdir(parents=True)
    (folder / "rl-seed0" / "train.log").write_text("interrupted at step 3\n")
    demo._run_stages(_run(folder, ["--stages", "rl", "--steps", "2"]))
    assert tools.ran == ["rl-seed0"]
    assert (folder / "rl-seed0.incomplete" / "train.log").read_text() == "interrupted at step 3\n"
    assert (folder / "rl-seed0" / "train.log").read_text() == "fake\n"


def test_rl_alone_starts_from_the_run_folders_finished_sft_model(tmp_path, tools):
    folder = tmp_path / "run"
    sft = _weights(folder / "sft" / "checkpoints" / "best" / "huggingface")
    run = _run(folder, ["--stages", "rl", "--seed", "2", "--steps", "2"])
    demo._run_stages(run)
    assert tools.ran == ["rl-seed2"] and run.models["sft"] == sft.resolve()


def test_rl_seeds_are_compared_with_the_model_they_started_from_not_with_each_other():
    assert demo.comparisons(["base", "sft", "rl-seed0", "rl-seed1"]) == [
        ("base", "sft"), ("sft", "rl-seed0"), ("sft", "rl-seed1")]
    assert demo.comparisons(["base", "rl-seed2"]) == [("base", "rl-seed2")]


def test_the_table_pools_the_rl_seeds_only_when_there_are_several():
    questions = {f"q{i}?": "bridge" for i in range(4)}

    def rows(label: str, correct: set[int]) -> list[report.EvalRow]:
        records = [{"question": q, "em": float(i in correct), "f1": 0.0, "searches": 1, "queries": 1,
                    "format_ok": True} for i, q in enumerate(questions)]
        return report.eval_rows(label, records, 4.0, questions)

    one_seed = rows("sft", {0}) + rows("rl-seed0", {0, 1})
    assert "pooled" not in demo.eval_table(one_seed)
    table = demo.eval_table(one_seed + rows("rl-seed1", {0, 1, 2, 3}))
    assert re.search(r"rl \(2 seeds pooled\) - sft\s+4\s+\+0\.500 ", table)  # (1/4 + 3/4) / 2
    assert re.search(r"rl-seed1 - sft\s+4\s+\+0\.750 ", table)


# -- run.json ----------------------------------------------------------------------------------------------

def test_run_json_records_each_command_and_refuses_another_preset_or_mode(tmp_path, monkeypatch, capsys):
    assert demo.record_run(_run(tmp_path, ["--preset", "full"]), ["--preset", "full"]) is False
    assert demo.record_run(_run(tmp_path, ["--preset", "full", "--seed", "1"]), ["--seed", "1"]) is True
    record = json.loads((tmp_path / "run.json").read_text())
    assert (record["preset"], record["mode"]) == ("full", "mq")
    assert [entry["settings"]["seed"] for entry in record["invocations"]] == [0, 1]
    first = record["invocations"][0]
    assert first["settings"]["algorithm"] == "grpo" and first["settings"]["steps"] == demo.PRESETS["full"].rl_steps
    assert "data.train_max_samples=-1" in first["settings"]["sft_overrides"]
    assert first["code"].get("git_commit") or first["code"].get("version")
    for argv in (["--preset", "quick"], ["--preset", "full", "--mode", "sq"]):
        with pytest.raises(demo.RunDirMismatch, match="use another --run-dir"):
            demo.record_run(_run(tmp_path, argv), argv)
    assert len(json.loads((tmp_path / "run.json").read_text())["invocations"]) == 2  # refusals add nothing
    assert not (tmp_path / "demo.log").exists()

    monkeypatch.setattr(signal, "signal", lambda *args: None)
    monkeypatch.setattr(demo, "_retriever", lambda url: pytest.fail("a refused run must not start"))
    assert demo.main(["--run-dir", str(tmp_path)]) == 2  # the default preset, quick
    assert "holds a run with preset full; this command asks for preset quick" in capsys.readouterr().err


def test_what_the_launcher_prints_goes_to_the_runs_log_too(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "_console_log", tmp_path / "demo.log")
    demo._out("SFT step    1  loss 1.0000")
    demo._out("RL failed", error=True)
    assert capsys.readouterr().out == "SFT step    1  loss 1.0000\n"
    assert (tmp_path / "demo.log").read_text() == "SFT step    1  loss 1.0000\nRL failed\n"
