"""The shipped demo corpus and question set: ids, splits, scripted search steps and answer containment.

These check the data files themselves (``retriever_server/demo``), so an edit that breaks an invariant an
offline teacher or the held-out evaluation relies on fails here.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import pytest

from retriever_server.demo import DEMO_CORPUS, DEMO_QUESTIONS

SPLITS = {"train", "dev", "test"}
TEST_MINIMUM_PER_KIND = 22  # single-hop, bridge and comparison each
DEV_PER_KIND = 26  # single-hop, bridge and comparison each: 78 dev questions to choose settings on
# The dev questions that training-time validation uses (SFT validation loss, RL validation): the 16 first
# written; the others carry "validation": false, so that validating during training costs what it always did.
VALIDATION_IDS = ("demo-014", "demo-018", "demo-028", "demo-033", "demo-035", "demo-037", "demo-045", "demo-062",
                  "demo-068", "demo-070", "demo-077", "demo-089", "demo-099", "demo-108", "demo-116", "demo-119")
TRAIN_MINIMUM = 170
STOPWORDS = {"birthplace", "born", "birth", "date", "year", "where", "which", "what", "when", "first",
             "with", "from", "that", "their", "after", "named", "name"}


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.fixture(scope="module")
def corpus() -> dict[str, str]:
    rows = _rows(DEMO_CORPUS)
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "duplicate passage ids"
    return {row["id"]: row["contents"] for row in rows}


@pytest.fixture(scope="module")
def questions() -> list[dict]:
    return _rows(DEMO_QUESTIONS)


def _kind(question: dict) -> str:
    return question["hops"] if question["type"] == "multi-hop" else "single-hop"


def _title(contents: str) -> str:
    return contents.split("\n", 1)[0].strip('"')


def _body(contents: str) -> str:
    return contents.split("\n", 1)[1]


def test_passage_ids_are_the_numbers_in_order_and_passages_have_a_title(corpus):
    assert list(corpus) == [str(number) for number in range(len(corpus))]
    for pid, contents in corpus.items():
        assert re.match(r'^"[^"\n]+"\n\S', contents), pid


def test_new_passages_have_the_house_length(corpus):
    for pid, contents in corpus.items():
        if int(pid) >= 300:
            assert 60 <= len(_body(contents).split()) <= 120, pid


def test_question_ids_are_unique_and_numbered(questions):
    ids = [q["id"] for q in questions]
    assert len(ids) == len(set(ids))
    assert ids == [f"demo-{number:03d}" for number in range(len(ids))]


def test_every_question_has_the_schema(questions):
    for q in questions:
        assert q["question"].strip() and q["question"].endswith("?"), q["id"]
        assert q["golden_answers"] and all(isinstance(a, str) and a.strip() for a in q["golden_answers"]), q["id"]
        assert q["split"] in SPLITS, q["id"]
        assert q["type"] in {"single-hop", "multi-hop"}, q["id"]
        if q["type"] == "multi-hop":
            assert q["hops"] in {"bridge", "comparison"}, q["id"]
        else:
            assert "hops" not in q, q["id"]
        assert isinstance(q["steps"], list) and q["steps"], q["id"]
        for step in q["steps"]:
            assert set(step) == {"query", "evidence_id", "evidence"}, q["id"]
            assert step["query"].strip() and len(step["query"].split()) <= 16, (q["id"], step["query"])


def test_split_sizes_and_the_held_out_minima(questions):
    counts = Counter((q["split"], _kind(q)) for q in questions)
    sizes = Counter(q["split"] for q in questions)
    for kind in ("single-hop", "bridge", "comparison"):
        assert counts["test", kind] >= TEST_MINIMUM_PER_KIND, (kind, counts)
        assert counts["dev", kind] == DEV_PER_KIND, (kind, counts)
    assert sizes["dev"] == 3 * DEV_PER_KIND
    assert sizes["train"] >= TRAIN_MINIMUM
    train = sizes["train"]
    # roughly 40% single-hop, 35% bridge, 25% comparison
    assert 0.33 <= counts["train", "single-hop"] / train <= 0.47
    assert 0.28 <= counts["train", "bridge"] / train <= 0.42
    assert 0.18 <= counts["train", "comparison"] / train <= 0.32


def test_step_counts_match_the_kind(questions):
    for q in questions:
        assert len(q["steps"]) == (1 if q["type"] == "single-hop" else 2), q["id"]


def test_every_evidence_is_an_exact_sentence_of_its_passage(questions, corpus):
    for q in questions:
        for step in q["steps"]:
            assert step["evidence_id"] in corpus, (q["id"], step["evidence_id"])
            evidence = step["evidence"]
            assert evidence in _body(corpus[step["evidence_id"]]), (q["id"], evidence)
            assert 5 <= len(evidence.split()) <= 40, (q["id"], evidence)


def test_supporting_ids_are_the_evidence_ids(questions, corpus):
    for q in questions:
        assert all(pid in corpus for pid in q["supporting_ids"]), q["id"]
        assert len(q["supporting_ids"]) == len(set(q["supporting_ids"])), q["id"]
        assert set(q["supporting_ids"]) == {step["evidence_id"] for step in q["steps"]}, q["id"]


def test_multi_hop_steps_use_two_passages(questions):
    for q in questions:
        if q["type"] == "multi-hop":
            assert len({step["evidence_id"] for step in q["steps"]}) == 2, q["id"]


def _contains(text: str, answers: list[str]) -> bool:
    return any(answer.lower() in text.lower() for answer in answers)


def test_the_last_evidence_states_a_golden_answer(questions, corpus):
    """Single-hop and bridge: the last step's evidence holds an answer verbatim.

    The one allowed exception is an answer that is the passage's own subject (its title), which the sentence
    stating the fact refers to as "it" or "the name" (demo-053, argon).
    """
    exceptions = []
    for q in questions:
        if q.get("hops") == "comparison":
            continue
        last = q["steps"][-1]
        if _contains(last["evidence"], q["golden_answers"]):
            continue
        title = _title(corpus[last["evidence_id"]]).lower()
        assert any(answer.lower() == title for answer in q["golden_answers"]), (q["id"], last["evidence"])
        exceptions.append(q["id"])
    assert len(exceptions) <= 2, exceptions


def test_a_comparison_answer_is_one_of_the_two_named_entities(questions, corpus):
    for q in questions:
        if q.get("hops") != "comparison":
            continue
        in_evidence = any(_contains(step["evidence"], q["golden_answers"]) for step in q["steps"])
        named = [a for a in q["golden_answers"] if a.lower() in q["question"].lower()]
        in_passage = any(_contains(corpus[step["evidence_id"]], named) for step in q["steps"])
        assert in_evidence or (named and in_passage), q["id"]


def test_each_comparison_query_names_only_its_own_entity(questions, corpus):
    for q in questions:
        if q.get("hops") != "comparison":
            continue
        first, second = (step["query"].lower() for step in q["steps"])
        titles = [_title(corpus[step["evidence_id"]]).lower() for step in q["steps"]]
        assert first != second, q["id"]
        # the other entity's title never appears in a step's query
        assert titles[1] not in first and titles[0] not in second, q["id"]


def test_a_bridge_second_query_names_the_bridge_entity(questions):
    """Step 2 of a bridge question names something step 1's evidence revealed and the question did not."""
    for q in questions:
        if q.get("hops") != "bridge":
            continue
        first, second = q["steps"]
        question_words = set(re.findall(r"[\w'-]+", q["question"].lower()))
        revealed = set(re.findall(r"[\w'-]+", first["evidence"].lower())) - question_words - STOPWORDS
        query_words = {w for w in re.findall(r"[\w'-]+", second["query"].lower()) if len(w) >= 4}
        assert query_words & revealed, (q["id"], second["query"])


def test_held_out_questions_are_not_train_questions(questions):
    train_text = {q["question"].strip().lower() for q in questions if q["split"] == "train"}
    train_facts = {(q["supporting_ids"][-1], a.lower()) for q in questions if q["split"] == "train"
                   for a in q["golden_answers"]}
    for q in questions:
        if q["split"] == "train":
            continue
        assert q["question"].strip().lower() not in train_text, q["id"]
        if q["type"] == "single-hop":
            # the same answer from the same passage would be the same fact asked again
            facts = {(q["supporting_ids"][-1], a.lower()) for a in q["golden_answers"]}
            assert not facts & train_facts, q["id"]


def test_no_two_questions_share_text(questions):
    texts = Counter(q["question"].strip().lower() for q in questions)
    assert [text for text, count in texts.items() if count > 1] == []


# -- the dev questions ---------------------------------------------------------------------------------------------

def test_training_time_validation_uses_the_first_16_dev_questions(questions):
    for q in questions:
        if "validation" in q:  # only ever false, only on dev questions
            assert q["split"] == "dev" and q["validation"] is False, q["id"]
    validation = [q["id"] for q in questions if q["split"] == "dev" and q.get("validation", True)]
    assert tuple(validation) == VALIDATION_IDS
    extra = [q["id"] for q in questions if q.get("validation") is False]
    assert extra and min(extra) > max(VALIDATION_IDS)  # appended: no earlier row changed its place


# A sentence ends at ".", "?" or "!" before a capital, unless the period closes an initial ("J. R. R.", "D.C.")
# or an abbreviation ("St. Paul").
_SENTENCE_END = re.compile(r"(?<![A-Z])(?<!\bSt|\bDr|\bMr|\bJr)[.?!]\s+(?=[A-Z])")


def _sentences(corpus: dict[str, str], pid: str, evidence: str) -> set[tuple[str, int]]:
    """The sentences of passage ``pid`` (as (pid, start offset)) that ``evidence`` overlaps."""
    text = _body(corpus[pid])
    start = text.index(evidence)
    end = start + len(evidence)
    bounds = [0] + [match.end() for match in _SENTENCE_END.finditer(text)] + [len(text) + 1]
    return {(pid, first) for first, after in itertools.pairwise(bounds) if first < end and start < after - 1}


def test_no_dev_question_asks_a_fact_a_test_question_asks(questions, corpus):
    """Choosing on dev must not choose on the held-out facts: no dev question states its evidence with a sentence
    a test question's evidence comes from, or answers what a test question answers from the same passage."""
    test = [q for q in questions if q["split"] == "test"]
    test_sentences = {key for q in test for step in q["steps"]
                      for key in _sentences(corpus, step["evidence_id"], step["evidence"])}
    test_answers = {(pid, answer.lower()) for q in test for pid in q["supporting_ids"]
                    for answer in q["golden_answers"]}
    assert len(test_sentences) > len(test)  # one or two sentences per question
    for q in questions:
        if q["split"] != "dev":
            continue
        for step in q["steps"]:
            shared = _sentences(corpus, step["evidence_id"], step["evidence"]) & test_sentences
            assert not shared, (q["id"], step["evidence"])
        assert not {(pid, answer.lower()) for pid in q["supporting_ids"] for answer in q["golden_answers"]} & \
            test_answers, q["id"]


def test_a_dev_answer_is_written_in_its_passage(questions, corpus):
    """The first gold answer is in the passage of the answer hop (single-hop, bridge) or of one of the compared
    entities, as written (case aside: "argon" opens its passage's sentences as "Argon")."""
    for q in questions:
        if q["split"] != "dev":
            continue
        steps = q["steps"] if q.get("hops") == "comparison" else q["steps"][-1:]
        answer = q["golden_answers"][0].lower()
        assert any(answer in corpus[step["evidence_id"]].lower() for step in steps), q["id"]


def test_dev_questions_are_not_train_questions(questions):
    """Beside the single-hop rule above: no dev question asks the same thing as a train question, with the same
    steps."""
    train = {(tuple(q["golden_answers"]), tuple((s["evidence_id"], s["evidence"]) for s in q["steps"]))
             for q in questions if q["split"] == "train"}
    for q in questions:
        if q["split"] == "dev":
            key = (tuple(q["golden_answers"]), tuple((s["evidence_id"], s["evidence"]) for s in q["steps"]))
            assert key not in train, q["id"]
