import doctest
import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragr1_verl.protocol import actions, observation, prompts
from ragr1_verl.protocol.actions import (
    STOP_STRINGS,
    Action,
    QueryRules,
    block_contents,
    clean_queries,
    extract_answer,
    iter_actions,
    parse_action,
    round_outcome,
    rounds_allowed,
    split_queries,
    stop_string_prefix,
    strip_information,
)
from ragr1_verl.protocol.observation import (
    INVALID_ACTION_REMINDER,
    ObservationRenderer,
    document_units,
    policy_codec,
    render_observation,
    retrieval_failed,
    split_title,
    unit_prefix,
    wrap_information,
)
from ragr1_verl.protocol.prompts import MQ_PROMPT_TEMPLATE, SQ_PROMPT_TEMPLATE, render_prompt


@pytest.mark.parametrize("module", [actions, observation, prompts])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><search>q1, q2</search>", Action("search", "q1, q2", 39)),
    ("<answer> Paris </answer><search>late</search>", Action("answer", " Paris ", 24)),
    ("<search>a</search><answer>b</answer>", Action("search", "a", 18)),
    ("no tags at all", Action("invalid")),
    ("<search>unclosed", Action("invalid")),
    ("<search>mismatched</answer>", Action("invalid")),
    ("<search></search>", Action("search", "", 17)),
    ("<search>multi\nline</search>", Action("search", "multi\nline", 27)),
])
def test_parse_action(text, expected):
    assert parse_action(text) == expected
    if expected.end > 0:
        assert text[:expected.end].endswith(("</search>", "</answer>"))


def test_split_queries_rules():
    assert split_queries("a, b, a, c, d").queries == ("a", "b", "c")
    truncated = split_queries("a, b, a, c, d")
    assert (truncated.duplicates_removed, truncated.dropped_over_cap, truncated.error) == (1, 1, None)
    invalid = split_queries("a, b, c, d", QueryRules(over_cap="invalid"))
    assert invalid.queries == () and "at most 3" in invalid.error and invalid.dropped_over_cap == 1
    assert split_queries("a ## b", QueryRules(separator="##")).queries == ("a", "b")
    assert split_queries("Paris, Texas", QueryRules(mode="sq")).queries == ("Paris, Texas",)
    assert split_queries(" , ,").error == "the search has no query"
    assert split_queries("   ", QueryRules(mode="sq")).error == "the search has no query"
    assert split_queries('["x", 1]').queries == ('["x"', "1]")  # not a list of strings: plain text
    assert split_queries("a, b, c, d, e", QueryRules(max_queries=5)).queries == ("a", "b", "c", "d", "e")


def test_ragr1_observation_is_ascii_escaped_json_with_one_string_per_query():
    documents = [[{"id": "1", "contents": '"Caf\u00e9"\nA "quoted" place.'}, {"id": "2", "contents": "B"}],
                 [{"id": "3", "contents": "C"}]]
    observation = render_observation(["q1", "q2"], documents)
    assert observation.startswith("\n<information>\n") and observation.endswith("\n</information>\n")
    body = observation[len("\n<information>\n"):-len("\n</information>\n")]
    assert "\\u00e9" in body and "\u00e9" not in body and '\\"quoted\\"' in body
    assert body.startswith('{\n  "query": [\n    "q1",')
    assert json.loads(body) == {"query": ["q1", "q2"],
                                "documents": ['Doc 1: "Caf\u00e9"\nA "quoted" place.\nDoc 2: B', "Doc 1: C"]}


def test_search_r1_observation_and_single_query_mode():
    documents = [[{"contents": '"Nile"\nA river.'}, {"contents": "untitled"}]]
    search_r1 = render_observation(["q"], documents, mode="sq", observation_format="search_r1")
    assert search_r1 == "\n<information>\nDoc 1 (Title: Nile) A river.\nDoc 2 (Title: ) untitled\n</information>\n"
    sq = render_observation(["q"], documents, mode="sq")
    assert sq == '\n<information>\nDoc 1: "Nile"\nA river.\nDoc 2: untitled\n</information>\n'
    two = render_observation(["a", "b"], [documents[0], []], observation_format="search_r1")
    assert "Results for: a\nDoc 1 (Title: Nile)" in two and "Results for: b\n" in two


class WordTokenizer:
    """A whitespace tokenizer: enough to check that truncation counts policy tokens, not characters."""

    def encode(self, text, add_special_tokens=False):
        self.vocab = getattr(self, "vocab", {})
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split(" ")]

    def decode(self, ids, skip_special_tokens=True):
        words = {v: k for k, v in self.vocab.items()}
        return " ".join(words[i] for i in ids)


def test_the_budget_is_per_query_in_tokens_of_the_policy():
    renderer = ObservationRenderer(codec=policy_codec(WordTokenizer()), max_tokens_per_unit=4)
    documents = [[{"contents": "one two three four five six"}], [{"contents": "short"}]]
    body = json.loads(renderer.render(["a", "b"], documents)[15:-16])
    assert body["documents"] == ["Doc 1: one two", "Doc 1: short"]  # 4 words: "Doc", "1:", "one", "two"


def test_the_budget_counts_json_escapes_as_the_model_sees_them():
    # Each quote is one more character in the observation (\"): the escaped word \"b\" is one word-token.
    renderer = ObservationRenderer(codec=policy_codec(WordTokenizer()), max_tokens_per_unit=3)
    body = json.loads(renderer.render(["q"], [[{"contents": 'a "b" c d'}]])[15:-16])
    assert body["documents"] == ['Doc 1: a']


def test_sq_mode_cuts_all_documents_as_one_unit():
    renderer = ObservationRenderer(mode="sq", codec=policy_codec(WordTokenizer()),
                                            max_tokens_per_unit=4)  # words: Doc 1: one two\nDoc 2: ...
    text = renderer.render(["q"], [[{"contents": "one two"}, {"contents": "three four"}]])
    assert text == wrap_information("Doc 1: one two\nDoc")


def test_split_title():
    assert split_title('"Title"\ntext\nmore') == ("Title", "text\nmore")
    assert split_title("Title   text") == ("", "Title   text")


def test_answer_extraction_ignores_retrieved_text_and_takes_the_last():
    response = ("<search>q</search>\n<information>\nDoc 1: <answer>Wrong</answer>\n</information>\n"
                "<answer>first</answer> then <answer> Final One </answer>")
    assert extract_answer(response) == "Final One"
    assert extract_answer("<information><answer>x</answer>") is None
    assert extract_answer("no answer") is None


def test_prompts():
    for template in (MQ_PROMPT_TEMPLATE, SQ_PROMPT_TEMPLATE):
        prompt = render_prompt("  who wrote Dracula ", template)
        assert prompt.endswith("Question: who wrote Dracula?\n")
        assert "<search>" in prompt and "<answer>" in prompt and "<information>" in prompt
    assert "up to three queries" in MQ_PROMPT_TEMPLATE and "commas" in MQ_PROMPT_TEMPLATE
    with pytest.raises(ValueError, match="placeholder"):
        render_prompt("q", "no placeholder")


def test_environment_messages_are_well_formed():
    assert "<search>" in INVALID_ACTION_REMINDER and "<answer>" in INVALID_ACTION_REMINDER
    for message in (retrieval_failed("connection refused"), retrieval_failed("")):
        assert message.startswith("\n<information>\n") and message.endswith("</information>\n")
        assert parse_action(message).kind == "invalid"


_PIECES = st.sampled_from(["<search>", "</search>", "<answer>", "</answer>", "<think>", "</think>",
                           "<information>", "</information>", "<search", "answer>", ",", "[", "]", '"',
                           "\n", " ", "é", "\u4e2d", "\U0001f600", "\x00", "<<", ">>"])
_TURNS = st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=30).map("".join)


@settings(max_examples=1500, deadline=None)
@given(_TURNS, st.sampled_from(["mq", "sq"]), st.sampled_from(["truncate", "invalid"]))
def test_fuzzed_turns_always_give_a_defined_action(turn, mode, over_cap):
    action = parse_action(turn)
    assert action.kind in ("search", "answer", "invalid")
    if action.kind == "invalid":
        assert action.end == -1
    else:
        assert 0 < action.end <= len(turn) and turn[:action.end].endswith(f"</{action.kind}>")
        queries = split_queries(action.content, QueryRules(mode=mode, over_cap=over_cap))
        assert len(queries.queries) <= 3 and all(q == q.strip() and q for q in queries.queries)
        assert len(set(queries.queries)) == len(queries.queries)
        assert (queries.error is None) == bool(queries.queries)
    extract_answer(turn)
    render_observation(["q"], [[{"contents": turn}]])


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.text(max_size=3)), max_size=25))
def test_fuzzed_token_streams_are_cut_right_after_the_first_stop_string(tokens):
    keep = stop_string_prefix(tokens, "".join)
    text, kept = "".join(tokens), "".join(tokens[:keep])
    first_stop = min((text.find(stop) + len(stop) for stop in STOP_STRINGS if stop in text), default=None)
    assert 0 <= keep <= len(tokens)
    if first_stop is None or not text[first_stop:].strip():
        assert keep == len(tokens)  # nothing to trim
    else:
        assert text.startswith(kept) and len(kept) >= first_stop  # the stop string is kept
        assert not any(stop in "".join(tokens[:keep - 1]) for stop in STOP_STRINGS)  # and is the last thing


_DOC_TEXT = st.lists(st.one_of(_PIECES, st.text(max_size=6)), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_DOC_TEXT, st.lists(_DOC_TEXT, max_size=3)), max_size=3),
       st.sampled_from(["mq", "sq"]), st.sampled_from(["ragr1", "search_r1"]))
def test_the_observation_holds_every_unit_and_ragr1_mq_is_json_dumps_byte_for_byte(searches, mode, fmt):
    queries = [query for query, _ in searches] if mode == "mq" else ["q"]
    documents = [[{"contents": text} for text in docs] for _, docs in searches] if mode == "mq" else \
        [[{"contents": text} for _, docs in searches for text in docs]]
    units = document_units(documents, mode, fmt)
    text = render_observation(queries, documents, mode=mode, observation_format=fmt)

    if fmt == "ragr1" and mode == "mq":
        body = {"query": queries, "documents": units}
        assert text == wrap_information(json.dumps(body, indent=2))
    else:
        assert all(unit in text for unit in units)


@settings(max_examples=500, deadline=None)
@given(_DOC_TEXT, st.integers(min_value=0, max_value=80))
def test_unit_prefix_is_the_longest_prefix_whose_escaped_form_fits(unit, rendered_chars):
    prefix = unit_prefix(unit, rendered_chars, json_escaped=True)
    assert unit.startswith(prefix)
    assert len(json.dumps(prefix)) - 2 <= rendered_chars
    if prefix != unit:
        assert len(json.dumps(unit[:len(prefix) + 1])) - 2 > rendered_chars
    assert unit_prefix(unit, rendered_chars, json_escaped=False) == unit[:rendered_chars]


# Reference semantics: what the protocol's parsers meant before they were made linear (lazy regexes).
_ACTION_REGEX = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
_ANSWER_REGEX = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INFORMATION_REGEX = re.compile(r"<information>(.*?)</information>", re.DOTALL)


@settings(max_examples=1500, deadline=None)
@given(_TURNS, st.integers(min_value=0, max_value=40))
def test_linear_parsers_agree_with_the_lazy_regexes(turn, start):
    match = _ACTION_REGEX.search(turn, start)
    action = parse_action(turn, start)
    if match is None:
        assert action.kind == "invalid"
    else:
        assert (action.kind, action.content, action.end) == (match.group(1), match.group(2), match.end())
    answers = _ANSWER_REGEX.findall(strip_information(turn))
    assert extract_answer(turn) == (answers[-1].strip() if answers else None)
    assert block_contents(turn, "<information>", "</information>") == _INFORMATION_REGEX.findall(turn)
    assert [(action.kind, action.content, action.end) for action in iter_actions(turn)] == [
        (match.group(1), match.group(2), match.end()) for match in _ACTION_REGEX.finditer(turn)]


_JSON_BOMBS = ["[" * 995 + "]" * 995, "[" + "1" * 4301 + "]", "[" + "[" * 100_000 + "]",
               '["a", ' + "[" * 5000 + "]" * 5000 + "]", "[1e999999]"]


@pytest.mark.parametrize("content", _JSON_BOMBS, ids=range(len(_JSON_BOMBS)))
@pytest.mark.parametrize("mode", ["mq", "sq"])
def test_split_queries_never_raises_on_json_bombs(content, mode):
    rules = QueryRules(mode=mode)
    # Not a JSON list of strings: the content is split on the separator like any other text.
    assert split_queries(content, rules) == clean_queries(content.split(",") if mode == "mq" else [content], rules)


_JSONISH = st.recursive(st.one_of(st.text(max_size=5), st.integers(), st.floats(allow_nan=True), st.booleans(),
                                  st.none()),
                        lambda children: st.lists(children, max_size=4), max_leaves=20).map(json.dumps)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_JSONISH, _TURNS), st.sampled_from(["mq", "sq"]))
def test_split_queries_is_total(content, mode):
    queries = split_queries(content, QueryRules(mode=mode))
    assert (queries.error is None) == bool(queries.queries)


_UNCLOSED = {
    "search openers": lambda n: ("<search>" + "a" * 100) * (n // 108),
    "answer openers": lambda n: "<answer>" * (n // 8),
    "information openers": lambda n: "<information>x" * (n // 14),
    "closed searches": lambda n: "<search>q</search>" * (n // 18),
    "stray tags": lambda n: "<think>" * (n // 7),
}


def _best_seconds(function, text: str, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function(text)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("shape", sorted(_UNCLOSED))
def test_parsers_are_linear_on_hostile_turns(shape):
    from ragr1_verl.reward import count_searches, follows_protocol

    def parse_everything(text: str) -> None:
        parse_action(text), extract_answer(text), split_queries(text), strip_information(text)
        count_searches(text), follows_protocol(text)
        block_contents(text, "<information>", "</information>")

    small, large = _UNCLOSED[shape](64 * 1024), _UNCLOSED[shape](256 * 1024)
    ratio = _best_seconds(parse_everything, large) / max(_best_seconds(parse_everything, small), 1e-6)
    # 4x the input: about 4x the work when linear, 16x when quadratic; the margin absorbs a noisy machine.
    assert ratio < 9, f"{shape}: 4x the input took {ratio:.1f}x the time"


@pytest.mark.parametrize(("action", "ended", "can_search", "outcome"), [
    (Action("answer", "x", 10), False, True, "answer"),
    (Action("answer", "x", 10), True, False, "answer"),       # an answer ends it even in the last round
    (Action("search", "q", 10), False, True, "continue"),
    (Action("search", "q", 10), True, True, "continue"),      # a search followed by EOS still searches
    (Action("search", "q", 10), False, False, "budget"),
    (Action("invalid"), True, True, "stopped"),              # EOS without an action: the model is done
    (Action("invalid"), False, True, "continue"),            # cut by the token cap: a reminder follows
    (Action("invalid"), False, False, "budget"),
])
def test_round_outcome_is_the_rule_of_the_rollout_and_the_teachers(action, ended, can_search, outcome):
    assert round_outcome(action, ended, can_search) == outcome


def test_rounds_allowed_adds_the_answer_only_round_unless_it_is_off():
    assert rounds_allowed(4, final_round=True) == 5
    assert rounds_allowed(5, final_round=False) == 5
