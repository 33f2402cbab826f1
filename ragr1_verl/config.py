"""The ``ragr1:`` config section: one typed place for every setting of the rollout and the search tool.

verl validates ``actor_rollout_ref.rollout.*`` strictly, so the plugin's settings live in a top-level
``ragr1:`` section of the trainer config (the recipes fill it in). The search tool reads the same keys from
its tool YAML ``config:``. Every key, its default and the paper's value are listed in ``docs/reference/configuration.md``
("Configuration reference"); :func:`load_config` rejects unknown keys and wrong types by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from ragr1_verl.environment import RETRIEVER_TOKEN, RETRIEVER_URL
from ragr1_verl.protocol.actions import Mode, QueryRules
from ragr1_verl.protocol.observation import Codec, ObservationFormat, ObservationRenderer
from ragr1_verl.protocol.prompts import PROMPT_FILE, PromptRecord, default_template, template_from_file
from ragr1_verl.records import DataError
from ragr1_verl.retrieval_client import DEFAULT_RETRIEVER_URL, RetrieverSettings
from ragr1_verl.settings import NOT_IN_PAPER, SettingDoc, documented, setting


class ConfigError(ValueError):
    """A ``ragr1`` setting is unknown or has a wrong value; the message names the key."""


@dataclass(frozen=True)
class RagR1Config:
    """The parsed ``ragr1:`` section. Defaults follow the paper's training setup."""

    retriever: RetrieverSettings = field(default_factory=lambda: RetrieverSettings(urls=(DEFAULT_RETRIEVER_URL,)))
    topk: int = setting(3, paper=3, help="documents per query")
    mode: Mode = setting("mq", paper="`mq` (`sq` ablation)",
                         help="`mq`: several queries per search, separated by `query_separator`; `sq`: the whole "
                              "`<search>` content is one query")
    max_turns: int = setting(4, paper="4 (train), 5 (eval)",
                             help="rounds in which a search is run; one last round follows (`final_round`)")
    final_round: bool = setting(
        True, paper="true (train), false (eval)",
        help="after `max_turns` searches, one more round that can only answer; false: the trajectory ends with "
             "the last search's results, as the original evaluation script stops")
    max_queries_per_search: int = setting(3, paper="3 (prompt only; the code has no cap)",
                                          help="queries kept from one search")
    over_query_cap: Literal["truncate", "invalid"] = setting(
        "truncate", help="past the cap: keep the first ones (`truncate`) or reject the search (`invalid`)")
    query_separator: str = setting(",", paper="`,`", help="separator between queries in `<search>` (a JSON list "
                                                          "of strings is accepted too)")
    observation_format: ObservationFormat = setting(
        "ragr1", paper="`ragr1`", help="`ragr1`: JSON `{\"query\", \"documents\"}`, indent 2, ASCII-escaped; "
                                       "`search_r1`: `Doc i (Title: t) text` lines")
    max_obs_tokens_per_query: int = setting(
        1000, paper=1000,
        help="each query's documents are cut to this many policy tokens (in `sq` mode, all documents together). "
             "The tokens are counted as the model sees them, inside the observation: in the `ragr1` format that "
             "is after JSON escaping, while the original code counted before escaping, so text with many "
             "escaped characters (`\\n`, quotes, non-ASCII as `\\uXXXX`) is cut slightly earlier.")
    max_tokens_per_turn: int = setting(500, paper=500, help="token cap of one generation round")
    prompt_template: str | None = setting(
        None, paper="(their prompt)",
        help="null: use the dataset's prompt as is. Otherwise `mq`, `sq`, a template string with `{question}`, "
             "or a file: the last user message is re-rendered from `extra_info.question`.")
    stop_strings: bool = setting(True, paper="no (their code generates up to 500 tokens, then cuts)",
                                 help="send `</search>` and `</answer>` as stop strings")

    @property
    def query_rules(self) -> QueryRules:
        return QueryRules(self.mode, self.query_separator, self.max_queries_per_search, self.over_query_cap)

    def observation_renderer(self, codec: Codec | None = None) -> ObservationRenderer:
        """How this section renders search results; ``codec``: the policy's tokenizer, for the budget."""
        return ObservationRenderer(self.mode, self.observation_format, codec, self.max_obs_tokens_per_query)


CHOICES = {  # the allowed values of each ragr1 key that has a fixed set; CLIs take their choices from here
    "mode": ("mq", "sq"),
    "over_query_cap": ("truncate", "invalid"),
    "observation_format": ("ragr1", "search_r1"),
}
IGNORED_KEYS = {  # accepted beside the settings and otherwise ignored
    "enabled": "a marker the recipes set; accepted and otherwise ignored",
    "type": "verl's tool YAML requires `type: native` in the same mapping; accepted and otherwise ignored",
}
_POSITIVE = {"topk", "max_queries_per_search", "max_obs_tokens_per_query", "max_tokens_per_turn"}
_RETRIEVER_KEYS = {f.name for f in fields(RetrieverSettings)} - {"urls"} | {"url"}


def reference_rows() -> list[SettingDoc]:
    """Every key of the section, as the configuration reference lists it (generated from the fields)."""
    return [*documented(RetrieverSettings, "retriever."), *documented(RagR1Config),
            *(SettingDoc(key, "(unset)", NOT_IN_PAPER, meaning) for key, meaning in IGNORED_KEYS.items())]


def load_config(section: Mapping[str, Any] | None, *, environ: Mapping[str, str] | None = None) -> RagR1Config:
    """Parse a ``ragr1`` section (a dict or an OmegaConf node; None means all defaults).

    An explicit retriever ``url`` or ``token`` wins. Where the section has none (or null),
    ``RAGR1_RETRIEVER_URL`` (one URL or a comma-separated list) and ``RAGR1_RETRIEVER_TOKEN`` fill them in,
    then the default URL. The recipes resolve the environment themselves (``${oc.env:...}``), so that a
    command-line override beats it: command line > environment > recipe default.
    """
    values = _to_dict(section)
    known = {f.name for f in fields(RagR1Config)}
    unknown = sorted(set(values) - known - set(IGNORED_KEYS))
    if unknown:
        raise ConfigError(f"unknown ragr1 setting(s) {unknown}; valid keys: {sorted(known)}")
    retriever = _retriever_settings(values.pop("retriever", None) or {}, environ)
    for ignored in IGNORED_KEYS:
        values.pop(ignored, None)
    config = RagR1Config(retriever=retriever)
    for name, value in values.items():
        config = replace(config, **{name: _checked(name, value, getattr(config, name))})
    if config.max_turns < 0:
        raise ConfigError(f"ragr1.max_turns must be 0 or more, got {config.max_turns}")
    return config


def _to_dict(section: Any) -> dict[str, Any]:
    if section is None:
        return {}
    from omegaconf import OmegaConf

    if OmegaConf.is_config(section):
        section = OmegaConf.to_container(section, resolve=True)
    if not isinstance(section, Mapping):
        raise ConfigError(f"the ragr1 section must be a mapping, got {type(section).__name__}")
    return dict(section)


def _checked(name: str, value: Any, default: Any) -> Any:
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"ragr1.{name} must be one of {list(CHOICES[name])}, got {value!r}")
    if name == "prompt_template":
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"ragr1.prompt_template must be a string or null, got {value!r}")
        return value
    expected = type(default)
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"ragr1.{name} must be an integer, got {value!r}")
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"ragr1.{name} must be true or false, got {value!r}")
    if expected is str and (not isinstance(value, str) or not value):
        raise ConfigError(f"ragr1.{name} must be a non-empty string, got {value!r}")
    if name in _POSITIVE and value < 1:
        raise ConfigError(f"ragr1.{name} must be at least 1, got {value}")
    return value


def _retriever_settings(section: Mapping[str, Any], environ: Mapping[str, str]) -> RetrieverSettings:
    section = _to_dict(section)
    unknown = sorted(set(section) - _RETRIEVER_KEYS)
    if unknown:
        raise ConfigError(f"unknown ragr1.retriever setting(s) {unknown}; valid keys: {sorted(_RETRIEVER_KEYS)}")
    url, token = section.pop("url", None), section.pop("token", None)
    urls = _urls(url if url not in (None, "") else RETRIEVER_URL.value(environ) or DEFAULT_RETRIEVER_URL)
    token = token if token not in (None, "") else RETRIEVER_TOKEN.value(environ)
    defaults = RetrieverSettings(urls=urls)
    for name, value in section.items():
        default = getattr(defaults, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"ragr1.retriever.{name} must be a number >= 0, got {value!r}")
        if isinstance(default, int) and not isinstance(value, int):
            raise ConfigError(f"ragr1.retriever.{name} must be an integer, got {value!r}")
    try:  # RetrieverSettings checks the ranges itself; its message names the field
        return replace(defaults, token=token, **section)
    except ValueError as err:
        raise ConfigError(f"ragr1.retriever: {err}") from None


def _urls(value: Any) -> tuple[str, ...]:
    """One URL, a comma-separated string or a list; a bare ``http://host:port`` gets ``/retrieve``."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"ragr1.retriever.url must be a URL or a list of URLs, got {value!r}")
    urls = tuple(_with_path(item.strip()) for item in items if item.strip())
    if not urls:
        raise ConfigError("ragr1.retriever.url is empty")
    return urls


def _with_path(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"ragr1.retriever.url must start with http:// or https://, got {url!r}")
    host_and_path = url.split("://", 1)[1]
    return url if "/" in host_and_path.rstrip("/") else url.rstrip("/") + "/retrieve"


PROMPT_TEMPLATE_HELP = ("'mq', 'sq', a template string with {question}, a text file holding one, a "
                        "ragr1_prompt.json (the prompt a checkpoint was trained with), or a data file (.parquet, "
                        ".jsonl, .json) whose rows' prompts give it back")


def resolve_prompt_template(value: str | None, mode: Mode) -> str:
    """The template text for ``ragr1.prompt_template``.

    ``None`` or ``"default"`` gives the built-in template of ``mode``; ``"mq"``/``"sq"`` a built-in one by
    name; a string containing ``{question}`` is the template itself; anything else is a file path: a
    ``ragr1_prompt.json`` record (what a checkpoint was trained with), a data file (``.parquet``, ``.jsonl``,
    ``.json``) whose rows' prompts give the template back, or a text file holding the template.
    """
    if value is None or value == "default":
        return default_template(mode)
    if value in ("mq", "sq"):
        return default_template(value)  # type: ignore[arg-type]
    if "{question}" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"ragr1.prompt_template: {value!r} has no {{question}} placeholder and is not a file")
    if path.suffix.lower() in (".parquet", ".jsonl", ".json"):
        return _template_from_data(path)
    text = path.read_text(encoding="utf-8")
    if "{question}" not in text:
        raise ConfigError(f"ragr1.prompt_template: {path} has no {{question}} placeholder")
    return text


def _template_from_data(path: Path) -> str:
    try:
        if path.name == PROMPT_FILE:
            template = PromptRecord.read(path).template
            if template is None:
                raise DataError(f"{path}: records no single template (the training rows' prompts differ)")
        else:
            template = template_from_file(path)
    except DataError as err:
        raise ConfigError(f"ragr1.prompt_template: {err}") from None
    if "{question}" not in template:
        raise ConfigError(f"ragr1.prompt_template: {path} gives a template without {{question}}")
    return template
