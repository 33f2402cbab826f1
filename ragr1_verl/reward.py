"""The RAG-R1 outcome reward: exact match (EM) of the model's last ``<answer>`` against the gold answers.

verl loads it as a custom reward function (verl 0.9.1 reads only the ``reward.`` keys in ``main_ppo``)::

    reward.custom_reward_function.path=pkg://ragr1_verl.reward
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.format_reward=true   # optional, see below

with the default ``naive`` reward manager (``reward.reward_manager.name=naive``). Its ``run_single`` calls
``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`` once per trajectory:

- ``solution_str`` is the decoded *response* only (valid response tokens, special tokens skipped), so the
  prompt and its example answer are not in it; everything the rollout inserted (``<information>`` blocks,
  reminders) is.
- ``ground_truth`` is the row's ``reward_model["ground_truth"]``.
- ``extra_info`` is the row's ``extra_info`` merged with the rollout's ``extra_fields`` (``ragr1/searches``,
  ``ragr1/answered``, ...), ``num_turns`` and ``rollout_reward_scores``.
- ``reward_kwargs`` arrive as keyword arguments and override verl's own.

The returned dict's ``score`` is the reward; every key (``score`` included) becomes a per-sample
``reward_extra_info`` column that verl aggregates with numpy, so every call returns the same keys, all
floats. In validation verl reports ``acc`` as the core metric when it is present: here it is always the EM.

Paper default: ``score`` is 1.0 for an exact match and 0.0 otherwise (``format_score`` for a wrong answer,
0.0). No format reward, no reward model. The optional Search-R1 v0.3 format-aware reward is documented in
:class:`RewardSettings`.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

import numpy as np

from ragr1_verl.protocol.actions import (
    INFORMATION_CLOSE,
    INFORMATION_OPEN,
    block_contents,
    extract_answer,
    iter_actions,
    strip_information,
)

logger = logging.getLogger(__name__)

# Chat-template headers that open an assistant message, and markers that close one. verl passes the response
# alone, decoded without special tokens, so none of these appear; they matter only when a caller passes the
# prompt too, with special tokens kept (the prompt's example ``<answer>`` must not be scored).
ASSISTANT_HEADERS = ("<|im_start|>assistant", "<|start_header_id|>assistant<|end_header_id|>")
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>")

# Keyword arguments verl itself adds when a reward model is configured; accepted and ignored.
_VERL_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_TAG = re.compile(r"<(/?)(think|search|answer|information)>")
# The protocol as a state machine over tag blocks: state -> {block tag: next state}.
_PROTOCOL = {
    "start": {"think": "thought"},
    "thought": {"search": "searched", "answer": "done"},
    "searched": {"information": "start"},
    "done": {},
}
_warned_kwargs: set[str] = set()


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop ASCII punctuation, drop a/an/the, collapse whitespace.

    The same steps, in the same order, as Search-R1's and verl's ``normalize_answer``, after a Unicode NFC
    composition so that canonically equal strings (``"e\\u0301"`` and ``"\\u00e9"``) compare equal.
    Non-ASCII punctuation (curly quotes, dashes) is kept, as in SQuAD.

    >>> normalize_answer("  The  Eiffel-Tower! ")
    'eiffeltower'
    """
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(char for char in text if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


_EVAL_SCRIPT_SPACED = _PUNCTUATION | frozenset("\u2018\u2019\u00b4`_")  # curly quotes, acute accent


def normalize_answer_eval_script(text: str) -> str:
    """The original RAG-R1 evaluation script's normalisation (``ragr1-eval --protocol paper``).

    Unlike :func:`normalize_answer`, underscores, ASCII punctuation and the quote marks ‘ ’ ´ ` become
    spaces rather than disappearing, so ``"Eiffel-Tower"`` gives ``"eiffel tower"``; then a/an/the are
    dropped and whitespace collapsed. No Unicode composition: the script had none.

    >>> normalize_answer_eval_script("  The  Eiffel-Tower! ")
    'eiffel tower'
    """
    text = text.lower()
    text = "".join(" " if char in _EVAL_SCRIPT_SPACED else char for char in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Iterable[str]) -> bool:
    """Whether the normalised prediction equals any normalised gold answer."""
    normalized = normalize_answer(prediction)
    return any(normalize_answer(gold) == normalized for gold in golds)


def substring_match(prediction: str, golds: Iterable[str]) -> bool:
    """Whether any normalised gold answer occurs in the normalised prediction.

    A gold that normalises to nothing (``"The"``) only matches an equally empty prediction: it would
    otherwise be contained in every prediction.
    """
    normalized = normalize_answer(prediction)
    return any(gold in normalized if gold else not normalized for gold in map(normalize_answer, golds))


def token_f1(prediction: str, golds: Iterable[str]) -> float:
    """SQuAD token-level F1 of the normalised prediction, the best over the gold answers."""
    predicted = normalize_answer(prediction).split()
    return max((_f1(predicted, normalize_answer(gold).split()) for gold in golds), default=0.0)


def _f1(predicted: list[str], gold: list[str]) -> float:
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def gold_answers(ground_truth: Any) -> list[str]:
    """The gold answers of a row, flattened to strings.

    Accepted: a string; an integer (its decimal form); a list, tuple or numpy array of those, nested to any
    depth (parquet gives back object arrays, possibly of arrays); a mapping ``{"target": <any of those>}``
    (Search-R1's layout). Anything else, or no answer at all, is a data bug and raises ``ValueError``.

    >>> gold_answers({"target": np.array(["Paris", "paris, france"], dtype=object)})
    ['Paris', 'paris, france']
    """
    golds = list(_flatten_golds(ground_truth))
    if not golds:
        raise ValueError(f"the ground truth holds no gold answer: {ground_truth!r}")
    return golds


def _flatten_golds(value: Any) -> Iterable[str]:
    if isinstance(value, str):  # numpy.str_ too
        yield value
    elif isinstance(value, Integral) and not isinstance(value, bool):
        yield str(int(value))
    elif isinstance(value, Mapping):
        if "target" not in value:
            keys = sorted(map(str, value))
            raise ValueError(f"a ground-truth mapping needs a 'target' key; got keys {keys}")
        yield from _flatten_golds(value["target"])
    elif isinstance(value, (list, tuple, np.ndarray)):
        items = value.ravel() if isinstance(value, np.ndarray) else value
        for item in items:
            yield from _flatten_golds(item)
    else:
        raise ValueError(
            f"unsupported ground-truth type {type(value).__name__} ({value!r}): expected a string, a list or "
            "numpy array of strings, or a {'target': ...} mapping")


def response_text(solution_str: str) -> str:
    """The model's own text: the last assistant message when chat markers are present, else all of it.

    With an assistant header (ChatML ``<|im_start|>assistant`` or Llama-3's), only the text after the last
    one is kept, so a prompt passed along with its special tokens (and its example answer) is ignored; the
    text is then cut at the first end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``). A prompt decoded with
    special tokens skipped cannot be told apart from the response: pass the response alone, as verl does.
    """
    starts = [solution_str.rfind(header) + len(header)
              for header in ASSISTANT_HEADERS if header in solution_str]
    text = solution_str[max(starts, default=0):]
    ends = [text.find(marker) for marker in END_OF_TURN_MARKERS if marker in text]
    return text[:min(ends)] if ends else text


def follows_protocol(response: str) -> bool:
    """Whether a response is exactly ``(think search information)* think answer``, nothing else.

    Blocks are ``<think>...</think>``, ``<search>...</search>``, ``<information>...</information>`` and
    ``<answer>...</answer>``; only whitespace may separate them and follow the answer. The think, search and
    answer contents may hold no protocol tag (no nesting); ``<information>`` content is the retriever's and
    is not inspected (it runs to the first ``</information>``). This is Search-R1 v0.3's
    ``is_valid_sequence`` without its prompt marker, and with retrieved text treated as opaque. Any
    reminder the rollout inserted after an invalid action is stray text, so such a response fails.

    >>> follows_protocol("<think>a</think> <search>q</search><information>d</information><think>b</think>"
    ...                  "<answer>x</answer>\\n")
    True
    >>> follows_protocol("<answer>x</answer>")
    False
    """
    state, position = "start", 0
    while True:
        match = _TAG.search(response, position)
        if response[position:match.start() if match else len(response)].strip():
            return False
        if match is None:
            return state == "done"
        closing, tag = match.groups()
        next_state = _PROTOCOL[state].get(tag)
        close = response.find(f"</{tag}>", match.end())
        if closing or next_state is None or close < 0:
            return False
        if tag != "information" and _TAG.search(response, match.end(), close):
            return False
        state, position = next_state, close + len(f"</{tag}>")


def count_searches(response: str) -> int:
    """How many complete ``<search>...</search>`` actions the model wrote outside ``<information>``."""
    return sum(action.kind == "search" for action in iter_actions(strip_information(response)))


def gold_retrieved(response: str, golds: Iterable[str]) -> bool:
    """Whether a normalised gold answer occurs in any retrieved ``<information>`` block."""
    bodies = [normalize_answer(body) for body in block_contents(response, INFORMATION_OPEN, INFORMATION_CLOSE)]
    normalized_golds = [gold for gold in map(normalize_answer, golds) if gold]
    return any(gold in body for body in bodies for gold in normalized_golds)


@dataclass(frozen=True)
class RewardSettings:
    """The reward's knobs, set through ``reward.custom_reward_function.reward_kwargs``.

    Default (the paper): ``score`` for an exact match, ``format_score`` for an answer that does not match,
    0 without an answer.

    With ``format_reward=True`` (Search-R1 v0.3, arXiv 2505.15117), ``format_score`` is unused and, with
    ``ok`` = :func:`follows_protocol` and ``retrieved`` = :func:`gold_retrieved`:

    ==================  =========================================================================
    exact match, ok     ``score``
    exact match, not ok ``score - structure_format_score``
    no match, ok        ``structure_format_score + retrieval_score * retrieved``
    answered, not ok    ``final_format_score`` (a wrong answer in a broken sequence)
    no answer, not ok   0
    ==================  =========================================================================

    ("no answer, ok" cannot happen: the protocol ends with an answer.) The defaults of the three format
    scores are those of Search-R1's v0.3 scripts.
    """

    score: float = 1.0
    format_score: float = 0.0
    format_reward: bool = False
    structure_format_score: float = 0.2
    final_format_score: float = 0.1
    retrieval_score: float = 0.0

    def __post_init__(self) -> None:
        # A string "false" from a hand-written config would be truthy: refuse anything but a real bool.
        if not isinstance(self.format_reward, (bool, np.bool_)):
            raise ValueError(f"format_reward must be true or false, got {self.format_reward!r}")
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name != "format_reward" and (isinstance(value, bool) or not isinstance(value, Real)):
                raise ValueError(f"reward kwarg {field.name} must be a number, got {value!r}")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> RewardSettings:
        """Settings from ``compute_score``'s keyword arguments; unknown names are logged once (typos)."""
        names = {field.name for field in fields(cls)}
        for name in sorted(set(kwargs) - names - _VERL_KWARGS - _warned_kwargs):
            _warned_kwargs.add(name)
            logger.warning("ragr1 reward: ignoring unknown keyword argument %r (known: %s)",
                           name, sorted(names))
        return cls(**{name: value for name, value in kwargs.items() if name in names})


def shaped_reward(correct: bool, answered: bool, format_ok: bool, retrieved: bool,
                  settings: RewardSettings) -> float:
    """The reward for one trajectory's outcome (table in :class:`RewardSettings`)."""
    if not settings.format_reward:
        if not answered:
            return 0.0
        return float(settings.score if correct else settings.format_score)
    if correct:
        return float(settings.score if format_ok else settings.score - settings.structure_format_score)
    if format_ok:
        return float(settings.structure_format_score + settings.retrieval_score * retrieved)
    return float(settings.final_format_score if answered else 0.0)


def _rollout_count(extra_info: Any, key: str) -> float | None:
    """A numeric counter the rollout left in ``extra_info``, or None when absent or not a number."""
    value = extra_info.get(key) if isinstance(extra_info, Mapping) else None
    if isinstance(value, Real) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    return None


def compute_score(data_source: str, solution_str: str | None, ground_truth: Any,
                  extra_info: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, float]:
    """Score one trajectory; verl's custom-reward entry point (``data_source`` is not used).

    Returns floats: ``score`` (the reward), ``acc`` (exact match of the last answer, 0/1, whatever the
    shaping), ``f1`` (token F1, best gold), ``substring_em`` (a gold inside the answer), ``format_ok``
    (:func:`follows_protocol`), ``answered`` (an ``<answer>`` outside ``<information>``) and ``searches``
    (``extra_info["ragr1/searches"]`` from the rollout, else :func:`count_searches`).

    The answer is the last ``<answer>`` of :func:`response_text` outside ``<information>`` blocks. A
    missing or non-string ``solution_str`` scores as an empty response; a bad ``ground_truth`` raises
    ``ValueError`` (see :func:`gold_answers`).

    >>> compute_score("nq", "<think>t</think><answer> the Eiffel tower </answer>", ["Eiffel Tower"])["score"]
    1.0
    """
    settings = RewardSettings.from_kwargs(kwargs)
    golds = gold_answers(ground_truth)  # checked on every row, answered or not: a data bug must surface
    if not isinstance(solution_str, str):
        if solution_str is not None:
            logger.warning("ragr1 reward: solution_str of type %s scored as empty",
                           type(solution_str).__name__)
        solution_str = ""
    response = response_text(solution_str)
    answer = extract_answer(response)
    prediction = answer if answer is not None else ""
    correct = answer is not None and exact_match(answer, golds)
    format_ok = follows_protocol(response)
    retrieved = bool(settings.format_reward and settings.retrieval_score) and gold_retrieved(response, golds)
    searches = _rollout_count(extra_info, "ragr1/searches")
    return {
        "score": shaped_reward(correct, answer is not None, format_ok, retrieved, settings),
        "acc": float(correct),
        "f1": token_f1(prediction, golds) if answer is not None else 0.0,
        "substring_em": float(answer is not None and substring_match(prediction, golds)),
        "format_ok": float(format_ok),
        "answered": float(answer is not None),
        "searches": searches if searches is not None else float(count_searches(response)),
    }
