"""RagR1SFTDataset: the loss mask covers exactly the model-written tokens, the token layout is the rollout's,
the paper's four sample kinds are all trained, truncation and padding follow verl, and verl's SFT trainer
builds the dataset through ``data.custom_cls``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from ragr1_verl.protocol.actions import INFORMATION_OPEN
from ragr1_verl.protocol.observation import wrap_information
from ragr1_verl.records import DataError
from ragr1_verl.sft.dataset import RagR1SFTDataset, SampleKind, TrajectoryError, split_trajectory

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"
TRAJECTORIES = FIXTURES / "sft_trajectories.jsonl"
# The rollout's observation wrapper, written out here as an oracle independent of the code under test.
INFORMATION_BLOCK = re.compile(r"\n<information>\n.*?\n</information>\n", re.DOTALL)
CUSTOM_CLS = ["data.custom_cls.path=pkg://ragr1_verl.sft.dataset",
              "data.custom_cls.name=RagR1SFTDataset"]


def teacher_rows(*, correct_only: bool = True) -> list[dict]:
    rows = [json.loads(line) for line in TRAJECTORIES.read_text().splitlines()]
    return [row for row in rows if row["em"] or not correct_only]


def write_rows(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist([{"prompt": row["messages"], "trajectory": row["trajectory"]}
                                         for row in rows]), path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def parquet(tmp_path) -> Path:
    return write_rows(tmp_path / "train.parquet", teacher_rows())


def dataset(path: Path, tokenizer, **config) -> RagR1SFTDataset:
    return RagR1SFTDataset(str(path), tokenizer, OmegaConf.create({"max_length": 4096, **config}))


def runs(ids: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    """The sequence as runs of equal mask: [(mask, ids), ...]."""
    grouped: list[tuple[int, list[int]]] = []
    for token, bit in zip(ids, mask, strict=True):
        if grouped and grouped[-1][0] == bit:
            grouped[-1][1].append(token)
        else:
            grouped.append((bit, [token]))
    return grouped


def prompt_text(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------- the mask


@pytest.mark.parametrize("row", teacher_rows(), ids=lambda row: row["id"])
def test_mask_covers_exactly_the_model_written_tokens(row, tokenizer, tmp_path):
    data = dataset(write_rows(tmp_path / "one.parquet", [row]), tokenizer)
    item = data[0]
    ids, mask = item["input_ids"].tolist(), item["loss_mask"].tolist()

    (first_mask, prompt_ids), *rest = runs(ids, mask)
    assert first_mask == 0 and tokenizer.decode(prompt_ids) == prompt_text(tokenizer, row["messages"])
    trained = [tokenizer.decode(run, skip_special_tokens=False) for bit, run in rest if bit]
    masked = [tokenizer.decode(run) for bit, run in rest if not bit]
    model_pieces = INFORMATION_BLOCK.split(row["trajectory"])
    model_pieces[-1] += tokenizer.eos_token  # the final answer is followed by a trained EOS
    assert trained == model_pieces
    assert masked == INFORMATION_BLOCK.findall(row["trajectory"])
    assert all(INFORMATION_OPEN not in piece for piece in trained)


def test_the_four_sample_kinds_each_train_their_span_in_the_papers_context(parquet, tokenizer):
    """Each trained run is the target of one of the paper's samples; the tokens before it are its input."""
    data = dataset(parquet, tokenizer)
    seen: dict[SampleKind, list[str]] = {}
    for index, row in enumerate(teacher_rows()):
        encoded = data.encode(index)
        start = 0
        kinds = iter(data.rows[index].trajectory.kinds)
        prefix = prompt_text(tokenizer, row["messages"])
        for bit, run in runs(encoded.input_ids, encoded.loss_mask):
            if bit:
                target = tokenizer.decode(run, skip_special_tokens=True)
                context = tokenizer.decode(encoded.input_ids[:start])
                assert context.startswith(prefix)  # the sample's input: the prompt and the trajectory so far
                assert row["trajectory"].startswith(context[len(prefix):] + target)
                seen.setdefault(SampleKind(next(kinds)), []).append(target)
            start += len(run)

    assert set(seen) == set(SampleKind)  # the fixture represents all four kinds
    answers = seen[SampleKind.ANSWER_DIRECTLY] + seen[SampleKind.ANSWER_AFTER_INFORMATION]
    searches = seen[SampleKind.SEARCH] + seen[SampleKind.SEARCH_AGAIN]
    assert all(target.endswith("</answer>") and "<search>" not in target for target in answers)
    assert all(target.endswith("</search>") and "<answer>" not in target for target in searches)
    assert seen[SampleKind.ANSWER_DIRECTLY] == [
        "<think>I know this one: France's capital is Paris.</think>\n<answer> Paris </answer>"]
    assert seen[SampleKind.SEARCH_AGAIN] == [("<think>He was born in Besançon; now the tower there.</think>\n"
                                              "<search> Besançon tower, Besançon tower architect </search>")]


def test_kinds_per_trajectory():
    kinds = {row["id"]: split_trajectory(row["trajectory"]).kinds for row in teacher_rows()}
    assert kinds == {"hp-1": [1], "hp-2": [2, 3], "hp-3": [2, 4, 3], "hp-5": [2, 3]}


def test_a_trajectory_that_ends_in_a_search_trains_the_search_without_eos(tokenizer, tmp_path):
    row = dict(teacher_rows()[1], trajectory="<think>look it up</think><search> Eiffel Tower </search>")
    data = dataset(write_rows(tmp_path / "open.parquet", [row]), tokenizer)

    encoded = data.encode(0)
    assert encoded.input_ids[-1] != tokenizer.eos_token_id
    assert tokenizer.decode(encoded.input_ids[encoded.prompt_length:]) == row["trajectory"]
    assert set(encoded.loss_mask[encoded.prompt_length:]) == {1}


def test_eos_after_answer_can_be_turned_off(parquet, tokenizer):
    with_eos, without = dataset(parquet, tokenizer).encode(0), dataset(parquet, tokenizer,
                                                                      eos_after_answer=False).encode(0)
    assert with_eos.input_ids == without.input_ids + [tokenizer.eos_token_id]
    assert with_eos.loss_mask == without.loss_mask + [1]


# ------------------------------------------------------------------------------- the rollout's layout


def test_token_layout_equals_the_agent_loops_for_the_same_turns(parquet, tokenizer, tiny_model_dir,
                                                                  retriever):
    """Play each teacher's model turns through the real agent loop (scripted LLM, documents from the fake
    retriever that also rendered the fixture): same ids, and the SFT loss mask is the rollout's response
    mask."""
    from tests.ragr1_verl.fakes import ScriptedLLM, scripted
    from tests.ragr1_verl.rollout import compose_trainer_config, run

    rows = teacher_rows()
    turns = {row["question"]: [segment.text for segment in split_trajectory(row["trajectory"]).segments
                                if segment.trained] for row in rows}
    config = compose_trainer_config(tiny_model_dir, prompt_length=1024, response_length=4096, ragr1={
        "retriever": {"url": retriever.url, "max_retries": 1, "backoff_base_s": 0.01}})
    _, _, rollouts = run(config, lambda tok: ScriptedLLM(tok, scripted(turns)),
                         [row["messages"][-1]["content"] for row in rows])

    data = dataset(parquet, tokenizer)
    for index, rollout in enumerate(rollouts):
        encoded = data.encode(index)
        assert encoded.input_ids == rollout.prompt_ids + rollout.response_ids + [tokenizer.eos_token_id]
        assert encoded.loss_mask == [0] * len(rollout.prompt_ids) + rollout.response_mask + [1]
        assert encoded.prompt_length == len(rollout.prompt_ids)


def test_observation_whitespace_is_normalised_to_the_rollouts_wrapper():
    released = ("<think>a</think><search> q </search>\n\n<information>{\"query\": [\"q\"]}</information>\n\n"
                "<think>b</think><answer> x </answer>\n")
    trajectory = split_trajectory(released)

    assert [segment.text for segment in trajectory.segments] == [
        "<think>a</think><search> q </search>", wrap_information('{"query": ["q"]}'),
        "\n<think>b</think><answer> x </answer>"]
    assert trajectory.answered and trajectory.searches == 1
    assert split_trajectory(trajectory.text) == trajectory  # the normalised text is a fixed point


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty"),
    ("<think>no action</think>", "without a complete <search> or <answer>"),
    ("<think>x</think><answer> a </answer> and more", "text after the final </answer>"),
    ("<search> q </search>\n<information>\nDoc 1: x", "never closed"),
    ("<search> q </search> I will guess <answer> a </answer>", "must be followed by <information>"),
    ("<information>made up</information><answer> a </answer>", "inside a model turn"),
    ("<search> q </search>\n<information>\nd\n</information>\n<think>stuck</think>", "at character 52:"),
])
def test_protocol_breaks_are_rejected_with_their_position(text, message):
    with pytest.raises(TrajectoryError, match=re.escape(message)):
        split_trajectory(text)


# ------------------------------------------------------------------------------ truncation and padding


def test_truncation_right_left_and_error(parquet, tokenizer):
    full = dataset(parquet, tokenizer).encode(2)
    limit = full.prompt_length + 20

    right = dataset(parquet, tokenizer, max_length=limit, truncation="right")[2]
    assert right["input_ids"].tolist() == full.input_ids[:limit]
    assert right["loss_mask"].tolist() == full.loss_mask[:limit]
    assert right["position_ids"].tolist() == list(range(limit))

    left = dataset(parquet, tokenizer, max_length=limit, truncation="left")[2]
    assert left["input_ids"].tolist() == full.input_ids[-limit:]
    assert left["loss_mask"].tolist() == full.loss_mask[-limit:]

    too_long = f"SFT row 2: {len(full.input_ids)} tokens, more than data.max_length"
    with pytest.raises(ValueError, match=too_long):
        dataset(parquet, tokenizer, max_length=limit, truncation="error")[2]


def test_right_padding_pads_to_max_length(parquet, tokenizer):
    full = dataset(parquet, tokenizer).encode(0)
    item = dataset(parquet, tokenizer, pad_mode="right", max_length=len(full.input_ids) + 7)[0]
    length = len(full.input_ids)

    assert set(item) == {"input_ids", "attention_mask", "position_ids", "loss_mask"}
    assert all(tensor.shape == (length + 7,) and tensor.dtype == torch.long for tensor in item.values())
    assert item["input_ids"].tolist() == full.input_ids + [tokenizer.pad_token_id] * 7
    assert item["attention_mask"].tolist() == [1] * length + [0] * 7
    assert item["loss_mask"].tolist() == full.loss_mask + [0] * 7
    assert item["position_ids"].tolist() == list(range(length)) + [0] * 7


def test_max_samples_first_rows_or_seeded_choice(parquet, tokenizer):
    config = OmegaConf.create({"shuffle": True, "seed": 3})
    first = RagR1SFTDataset(str(parquet), tokenizer, OmegaConf.create({}), max_samples=2)
    chosen = [RagR1SFTDataset(str(parquet), tokenizer, config, max_samples=2).rows for _ in range(2)]

    assert len(first) == 2 and first.rows == dataset(parquet, tokenizer).rows[:2]
    assert chosen[0] == chosen[1] and len(chosen[0]) == 2


# -------------------------------------------------------------------------------------- verl integration


def compose_sft_config(tiny_model_dir: Path, train: Path, *overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("verl.trainer.config", version_base=None):
        return compose("sft_trainer_engine", overrides=[
            f"model.path={tiny_model_dir}", f"data.train_files={train}", f"data.val_files={train}",
            "data.max_length=2048", *CUSTOM_CLS, *overrides])


@pytest.mark.parametrize("pad_mode", ["no_padding", "right"])
def test_verl_sft_trainer_builds_and_collates_the_dataset(pad_mode, parquet, tokenizer, tiny_model_dir):
    from verl.trainer.sft_trainer import create_sft_dataset
    from verl.utils.dataset.dataset_utils import SFTTensorCollator

    config = compose_sft_config(tiny_model_dir, parquet, f"data.pad_mode={pad_mode}",
                                "+data.eos_after_answer=false")
    built = create_sft_dataset(config.data.train_files, config.data, tokenizer, None,
                               max_samples=config.data.get("train_max_samples", -1))
    batch = SFTTensorCollator(config.data.pad_mode)([built[index] for index in range(len(built))])

    assert isinstance(built, RagR1SFTDataset) and len(built) == len(teacher_rows())
    assert not built.eos_after_answer and built.max_length == 2048
    if pad_mode == "no_padding":
        assert set(batch) == {"input_ids", "position_ids", "loss_mask"} and batch["input_ids"].is_nested
        assert batch["loss_mask"][2].tolist() == built.encode(2).loss_mask
    else:
        assert batch["input_ids"].shape == batch["loss_mask"].shape == (len(built), 2048)


@pytest.mark.parametrize("pad_mode", ["no_padding", "right"])
def test_items_have_the_keys_and_dtypes_of_verls_multiturn_dataset(pad_mode, tokenizer, tmp_path):
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    row = teacher_rows()[0]
    messages = row["messages"] + [{"role": "assistant", "content": row["trajectory"]}]
    pq.write_table(pa.Table.from_pylist([{"messages": messages}]), tmp_path / "verl.parquet")
    config = OmegaConf.create({"pad_mode": pad_mode, "max_length": 1024, "truncation": "error"})
    theirs = MultiTurnSFTDataset(str(tmp_path / "verl.parquet"), tokenizer, config)[0]
    ours = RagR1SFTDataset(str(write_rows(tmp_path / "ours.parquet", [row])), tokenizer, config)[0]

    assert set(ours) == set(theirs)
    assert all(ours[key].dtype == theirs[key].dtype and ours[key].dim() == theirs[key].dim() for key in ours)
    if pad_mode == "no_padding":
        # Without retrieved text both train the assistant text; verl's ends with the template's <|im_end|>\n.
        assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()[:len(ours["input_ids"])]


# ------------------------------------------------------------------------------------------ bad input


def test_a_bad_row_fails_at_construction_naming_file_row_and_field(tokenizer, tmp_path):
    rows = teacher_rows()
    rows[1] = dict(rows[1], trajectory="<think>forgot to act</think>")
    path = write_rows(tmp_path / "bad.parquet", rows)

    with pytest.raises(DataError, match=re.escape(f"{path}, row 2, field 'trajectory': at character 0")):
        dataset(path, tokenizer)


def test_missing_column_and_bad_prompt_are_named(tokenizer, tmp_path):
    pq.write_table(pa.Table.from_pylist([{"messages": [], "trajectory": "x"}]), tmp_path / "cols.parquet")
    with pytest.raises(DataError, match=r"cols.parquet, field 'prompt': no such column"):
        dataset(tmp_path / "cols.parquet", tokenizer)

    pq.write_table(pa.Table.from_pylist([{"prompt": [], "trajectory": "<answer>x</answer>"}]),
                   tmp_path / "prompt.parquet")
    with pytest.raises(DataError, match=r"prompt.parquet, row 1, field 'prompt': expected a non-empty list"):
        dataset(tmp_path / "prompt.parquet", tokenizer)
