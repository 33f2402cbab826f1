"""``ragr1-verl-demo``'s pieces that need no training run: stages, command lines, the tables and the plot."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ragr1_verl.demo import cli as demo
from ragr1_verl.demo import report
from ragr1_verl.demo.summary import ModelEvaluation, RunSummary, write_summary
from ragr1_verl.evaluation.report import read_results
from retriever_server.demo import load_demo_questions


def _run(tmp_path, argv=(), overrides=()):
    args, extra = demo.make_parser().parse_known_args(list(argv))
    run = demo.Run(tmp_path, args, [*extra, *overrides])
    run.retriever_url = "http://127.0.0.1:1/retrieve"
    run.models["base"] = tmp_path / "base"
    return run


def test_stages_keep_the_pipeline_order_and_refuse_unknown_names():
    assert demo.make_parser().parse_args([]).stages == ("sft", "rl", "eval")
    assert demo.make_parser().parse_args(["--stages", "eval,rl"]).stages == ("rl", "eval")
    with pytest.raises(argparse.ArgumentTypeError):
        demo._stages("rl,dpo")


def test_rl_starts_from_the_sft_model_saves_the_final_actor_and_user_overrides_come_last(tmp_path):
    run = _run(tmp_path, ["--mode", "sq", "--steps", "4"], ["ragr1.max_turns=3"])
    command = demo.rl_command(run, tmp_path / "sft-best")
    assert command[1:4] == ["-m", "verl.trainer.main_ppo", "+recipe=ragr1_cpu"]
    assert f"actor_rollout_ref.model.path={tmp_path / 'sft-best'}" in command
    assert "actor_rollout_ref.actor.checkpoint.save_contents=[hf_model]" in command
    assert {"ragr1.mode=sq", "ragr1.prompt_template=sq", "trainer.total_training_steps=4"} <= set(command)
    assert "trainer.test_freq=-1" in command  # the eval stage measures the models: no validation pass
    assert "trainer.test_freq=4" in demo.rl_command(_run(tmp_path, ["--stages", "rl", "--steps", "4"]), tmp_path)
    assert command[-1] == "ragr1.max_turns=3"


def test_sft_uses_the_mode_recipe_and_the_given_model(tmp_path):
    run = _run(tmp_path, ["--mode", "sq", "--model", str(tmp_path / "m"), "--sft-override", "trainer.total_epochs=1"])
    run.models["base"] = tmp_path / "m"
    command = demo.sft_command(run, tmp_path / "ckpt")
    assert "verl.trainer.sft_trainer" in command and "+recipe=ragr1_sft_cpu_sq" in command
    assert f"model.path={tmp_path / 'm'}" in command and command[-1] == "trainer.total_epochs=1"


def test_the_final_actor_is_the_highest_saved_step(tmp_path):
    for step in (2, 10, 9):
        (tmp_path / f"global_step_{step}" / "actor" / "huggingface").mkdir(parents=True)
    assert demo.final_actor(tmp_path) == (tmp_path / "global_step_10" / "actor" / "huggingface").resolve()
    with pytest.raises(demo.StageFailed):
        demo.final_actor(tmp_path / "nothing")


def test_evaluation_plays_the_rl_recipes_rollout_settings_with_the_users_overrides(tmp_path):
    run = _run(tmp_path, [], ["ragr1.max_turns=3", "trainer.total_training_steps=2"])
    settings = demo.rollout_settings(run)
    assert settings["ragr1"]["max_turns"] == 3
    command = demo.eval_command(run, "sft", tmp_path / "model", tmp_path / "test.parquet", settings)
    value = {flag: command[i + 1] for i, flag in enumerate(command) if flag.startswith("--") and i + 1 < len(command)}
    assert value["--max-turns"] == "3" and value["--topk"] == str(settings["ragr1"]["topk"])
    assert value["--max-response-tokens"] == str(settings["response"]) and "--greedy" in command


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_sq_mode_overrides_compose_with_the_rl_recipe(tmp_path, algorithm):
    # The overrides --mode sq adds to main_ppo, composed with verl's real config as main_ppo composes them.
    run = _run(tmp_path, ["--mode", "sq", "--algorithm", algorithm], [])
    settings = demo.rollout_settings(run)
    assert settings["ragr1"]["mode"] == "sq" and settings["ragr1"]["prompt_template"] == "sq"


def _record(question, em, searches, queries, format_ok=1.0):
    return {"question": question, "em": em, "f1": em, "searches": searches, "queries": queries,
            "format_ok": format_ok}


def test_eval_rows_average_per_question_and_queries_per_search_over_searches():
    records = [_record("a?", 1.0, 1, 3), _record("b?", 0.0, 0, 0, format_ok=0.0), _record("c?", 1.0, 2, 2)]
    types = {"a?": "comparison", "b?": "single-hop", "c?": "comparison"}
    rows = {row.group: row for row in report.eval_rows("sft", records, wall_seconds=30.0, question_types=types)}
    assert rows["all"].em == pytest.approx(2 / 3) and rows["all"].searches_per_question == 1.0
    assert rows["all"].queries_per_search == pytest.approx(5 / 3)  # 5 queries in 3 searches
    assert rows["all"].protocol == pytest.approx(2 / 3) and rows["all"].seconds_per_question == 10.0
    assert rows["comparison"].queries_per_search == pytest.approx(5 / 3) and rows["single-hop"].queries_per_search == 0
    table = report.eval_table(list(rows.values()))
    assert table.splitlines()[1].split()[:3] == ["sft", "3", "0.667"]
    assert any(line.split()[:1] == ["sft/comparison"] for line in table.splitlines()[1:])


def test_rl_rows_read_the_rollouts_own_metrics():
    row = report.format_rl_row(3, {"critic/score/mean": 0.25, "ragr1/em": 0.5, "ragr1/searches_per_trajectory": 1.0,
                                   "ragr1/queries_per_search": 1.5, "timing_s/step": 12.0})
    assert row.split()[:6] == ["3", "0.250", "-", "0.500", "1.00", "1.50"] and row.split()[-1] == "12.0"
    summary = report.validation_summary({3: {"val-core/demo/acc/mean@1": 0.5, "val-aux/demo/searches/mean@1": 1.25}})
    assert summary == "validation after step 3: EM 0.500, searches/question 1.25"


def test_metrics_files_skip_a_cut_line_and_the_plot_is_a_png(tmp_path):
    metrics = tmp_path / "m.jsonl"
    metrics.write_text(json.dumps({"step": 1, "data": {"train/loss": 2.0}}) + "\n"
                       + json.dumps({"step": 2, "data": {"train/loss": 1.0, "val/loss": 1.5}}) + "\n{\"step\": 3, \"da")
    sft = report.read_metrics(metrics)
    assert sorted(sft) == [1, 2] and sft[2]["val/loss"] == 1.5
    plot = report.write_plot(tmp_path / "p.png", sft, {1: {"critic/score/mean": 0.1, "ragr1/em": 0.2}})
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.write_plot(tmp_path / "none.png", {}, {}) is None


def test_sft_progress_prints_every_few_steps_and_each_validation_even_when_it_comes_later(tmp_path, capsys):
    metrics = tmp_path / "m.jsonl"
    progress = demo.SFTProgress(metrics)

    def log(step, **data):
        with metrics.open("a") as handle:
            handle.write(json.dumps({"step": step, "data": {k.replace("_", "/"): v for k, v in data.items()}}) + "\n")
        progress.report()

    for step in range(1, 6):
        log(step, train_loss=1.0 / step)
    log(5, val_loss=0.9)  # verl logs the validation after the step's training line
    log(6, train_loss=0.1)
    progress.report(final=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["SFT step    1  loss 1.0000", "SFT step    5  loss 0.2000",
                     "SFT step    5  validation loss 0.9000", "SFT step    6  loss 0.1000"]


def test_an_earlier_sft_model_is_the_rl_start_and_the_after_sft_model(tmp_path, monkeypatch):
    run = _run(tmp_path, ["--stages", "rl", "--sft-model", str(tmp_path / "sft")])
    started = []
    monkeypatch.setattr(demo, "_base_model", lambda run: tmp_path / "base")
    monkeypatch.setattr(demo, "_rl_stage", lambda run: started.append(run.models.get("sft", run.models["base"])))
    demo._run_stages(run)
    assert started == [(tmp_path / "sft").resolve()] and list(run.models) == ["base", "sft"]


def _finished_eval(folder, label, records, seconds, mode):
    out = folder / "eval" / label
    out.mkdir(parents=True)
    (folder / demo.RUN_FILE).write_text(json.dumps({"preset": "full", "mode": mode}))
    lines = [json.dumps({"id": f"demo/{number}", **record}) + "\n" for number, record in enumerate(records)]
    (out / "results.jsonl").write_text("".join(lines))
    timings = folder / demo.TIMINGS_FILE
    known = json.loads(timings.read_text()) if timings.exists() else {}
    timings.write_text(json.dumps({**known, f"eval/{label}": seconds}))


def test_compare_modes_prints_table_5_of_two_run_folders_as_a_user_runs_it(tmp_path):
    by_type: dict[str, list[dict]] = {}
    for question in load_demo_questions():
        if question["split"] == "test":
            by_type.setdefault(question.get("hops") or question["type"], []).append(question)
    held_out = [question for questions in by_type.values() for question in questions[:2]]
    assert len(by_type) == 3 and len(held_out) == 6
    mq, sq = tmp_path / "mq", tmp_path / "sq"
    _finished_eval(mq, "sft", [_record(q["question"], 1.0, 1, 2) for q in held_out], 12.0, "mq")
    _finished_eval(sq, "sft", [_record(q["question"], 0.0, 2, 2) for q in held_out], 24.0, "sq")
    command = Path(sys.executable).with_name("ragr1-verl-demo")  # the console script pip installed
    done = subprocess.run([str(command), "--compare-modes", str(mq), str(sq)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()[:1] and
            line.split()[0].startswith("sft")}
    assert rows["sft"][1:5] == ["6", "1.000", "0.000", "+1.000"]
    assert rows["sft"][7:10] == ["1.00", "2.00", "0.50"] and rows["sft"][12:14] == ["2.00", "4.00"]
    assert set(rows) == {"sft", *(f"sft/{kind}" for kind in by_type)}
    assert all(row[1:5] == ["2", "1.000", "0.000", "+1.000"] for name, row in rows.items() if name != "sft")

    # the same table from the runs' summary files, once the folders are gone
    summaries = []
    for folder, mode in ((mq, "mq"), (sq, "sq")):
        summaries.append(tmp_path / f"{mode}-summary.json")
        write_summary(summaries[-1], RunSummary({"mode": mode}, {"sft": ModelEvaluation(
            tuple(read_results(folder / "eval" / "sft")), json.loads((folder / demo.TIMINGS_FILE).read_text())["eval/sft"])}))
        shutil.rmtree(folder)
    again = subprocess.run([str(command), "--compare-modes", *map(str, summaries)], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[2:] == done.stdout.splitlines()[2:]  # all but the "mq: ...", "sq: ..." lines


def test_compare_modes_refuses_folders_in_the_wrong_order_or_without_evaluations(tmp_path, capsys):
    mq, sq = tmp_path / "mq", tmp_path / "sq"
    _finished_eval(mq, "sft", [_record("a?", 1.0, 1, 2)], 1.0, "mq")
    _finished_eval(sq, "sft", [_record("a?", 1.0, 1, 1)], 1.0, "sq")
    assert demo.main(["--compare-modes", str(sq), str(mq)]) == 2  # swapped: the signs would flip
    assert "this run's mode is sq, expected mq" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / demo.RUN_FILE).write_text(json.dumps({"mode": "sq"}))
    assert demo.main(["--compare-modes", str(mq), str(empty)]) == 2
    assert "no evaluation under" in capsys.readouterr().err
    assert demo.main(["--compare-modes", str(mq), str(sq)]) == 0
    summary = tmp_path / "sq-summary.json"
    write_summary(summary, RunSummary({"mode": "mq"}, {}))  # a summary of the wrong mode
    assert demo.main(["--compare-modes", str(mq), str(summary)]) == 2
    assert f"{summary}: this run's mode is mq, expected sq" in capsys.readouterr().err
    summary.write_text('{"format": 1, "run": {"mode": "sq"}, "models": {"sft": {"seconds": 1, "records": [{}]}}}')
    assert demo.main(["--compare-modes", str(mq), str(summary)]) == 2
    assert f"{summary}: models.sft.records[0].question" in capsys.readouterr().err
