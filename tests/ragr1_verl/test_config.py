"""The ``ragr1:`` section: defaults, validation by key name, environment overrides, prompt templates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ragr1_verl.config import ConfigError, load_config, resolve_prompt_template
from ragr1_verl.protocol.prompts import MQ_PROMPT_TEMPLATE, SQ_PROMPT_TEMPLATE
from ragr1_verl.settings import shown

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_paper_training_setup():
    config = load_config(None, environ={})

    assert (config.topk, config.max_turns, config.max_queries_per_search) == (3, 4, 3)
    assert (config.max_obs_tokens_per_query, config.max_tokens_per_turn) == (1000, 500)
    assert (config.mode, config.query_separator, config.observation_format) == ("mq", ",", "ragr1")
    assert config.retriever.urls == ("http://127.0.0.1:8000/retrieve",)


def test_an_omegaconf_section_with_interpolations_is_accepted():
    section = OmegaConf.create({"k": 5, "ragr1": {"topk": "${k}", "retriever": {"url": ["http://a:1", "http://b:2/x"]}}})
    config = load_config(section.ragr1, environ={})

    assert config.topk == 5
    assert config.retriever.urls == ("http://a:1/retrieve", "http://b:2/x")


@pytest.mark.parametrize("section, key", [
    ({"top_k": 3}, "top_k"),
    ({"retriever": {"urls": "http://x"}}, "urls"),
    ({"mode": "multi"}, "mode"),
    ({"topk": 0}, "topk"),
    ({"topk": "3"}, "topk"),
    ({"max_turns": -1}, "max_turns"),
    ({"stop_strings": "yes"}, "stop_strings"),
    ({"retriever": {"timeout_s": "slow"}}, "timeout_s"),
    ({"retriever": {"url": "localhost:8000"}}, "url"),
])
def test_bad_settings_name_the_key(section, key):
    with pytest.raises(ConfigError, match=key):
        load_config(section, environ={})


ENVIRON = {"RAGR1_RETRIEVER_URL": "http://10.0.0.1:8000, http://10.0.0.2:8000", "RAGR1_RETRIEVER_TOKEN": "s3"}


def test_the_environment_fills_in_a_missing_url_and_token():
    for section in ({}, {"retriever": {}}, {"retriever": {"url": None, "token": None}}):
        config = load_config(section, environ=ENVIRON)
        assert config.retriever.urls == ("http://10.0.0.1:8000/retrieve", "http://10.0.0.2:8000/retrieve")
        assert config.retriever.token == "s3"
    assert load_config({}, environ={}).retriever.urls == ("http://127.0.0.1:8000/retrieve",)
    assert load_config({}, environ={}).retriever.token is None


def test_an_explicit_url_and_token_beat_the_environment():
    config = load_config({"retriever": {"url": "http://explicit:1", "token": "mine"}}, environ=ENVIRON)
    assert config.retriever.urls == ("http://explicit:1/retrieve",) and config.retriever.token == "mine"


@pytest.mark.parametrize("recipe", ["ragr1", "ragr1_cpu", "ragr1_sq", "ragr1_grpo"])
def test_recipes_take_the_command_line_then_the_environment_then_their_default(recipe, monkeypatch):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    def retriever(*overrides: str):
        with initialize_config_module("verl.trainer.config", version_base=None):
            config = compose("ppo_trainer", overrides=[f"+recipe={recipe}", *overrides])
        return load_config(OmegaConf.to_container(config.ragr1, resolve=True), environ={}).retriever

    monkeypatch.delenv("RAGR1_RETRIEVER_URL", raising=False)
    monkeypatch.delenv("RAGR1_RETRIEVER_TOKEN", raising=False)
    assert retriever().urls == ("http://127.0.0.1:8000/retrieve",) and retriever().token is None
    monkeypatch.setenv("RAGR1_RETRIEVER_URL", "http://from-env:9000/retrieve")
    monkeypatch.setenv("RAGR1_RETRIEVER_TOKEN", "env-token")
    assert retriever().urls == ("http://from-env:9000/retrieve",) and retriever().token == "env-token"
    explicit = retriever("ragr1.retriever.url=http://explicit:7000/retrieve", "ragr1.retriever.token=cli")
    assert explicit.urls == ("http://explicit:7000/retrieve",) and explicit.token == "cli"


def test_tool_yaml_keys_are_accepted():
    config = load_config({"type": "native", "enabled": True, "topk": 2}, environ={})
    assert config.topk == 2


def test_query_rules_follow_the_settings():
    rules = load_config({"mode": "sq", "query_separator": ";", "max_queries_per_search": 5,
                         "over_query_cap": "invalid"}, environ={}).query_rules
    assert (rules.mode, rules.separator, rules.max_queries, rules.over_cap) == ("sq", ";", 5, "invalid")


def test_prompt_templates_by_name_text_and_file(tmp_path):
    template_file = tmp_path / "template.txt"
    template_file.write_text("Q: {question}\n")

    assert resolve_prompt_template(None, "sq") == SQ_PROMPT_TEMPLATE
    assert resolve_prompt_template("mq", "sq") == MQ_PROMPT_TEMPLATE
    assert resolve_prompt_template("Answer {question}", "mq") == "Answer {question}"
    assert resolve_prompt_template(str(template_file), "mq") == "Q: {question}\n"
    with pytest.raises(ConfigError, match="not a file"):
        resolve_prompt_template(str(tmp_path / "missing.txt"), "mq")
    (tmp_path / "bad.txt").write_text("no placeholder")
    with pytest.raises(ConfigError, match="placeholder"):
        resolve_prompt_template(str(tmp_path / "bad.txt"), "mq")


def _config_reference():
    """scripts/config_reference.py (scripts/ is no package: loaded from its file)."""
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_reference_is_the_one_the_fields_generate():
    reference = _config_reference()
    assert reference.page_table(reference.PAGE.read_text(encoding="utf-8")) == reference.rendered(), \
        "docs/reference/configuration.md is out of date: run `python scripts/config_reference.py --write`"


def test_every_setting_has_help_and_the_reference_lists_every_key_with_its_real_default():
    from dataclasses import fields

    from ragr1_verl.config import IGNORED_KEYS, RagR1Config, load_config, reference_rows
    from ragr1_verl.retrieval_client import DEFAULT_RETRIEVER_URL, RetrieverSettings

    rows = {row.key: row for row in reference_rows()}
    keys = {f.name for f in fields(RagR1Config)} - {"retriever"}
    keys |= {"retriever.url"} | {f"retriever.{f.name}" for f in fields(RetrieverSettings)} - {"retriever.urls"}
    assert set(rows) == keys | set(IGNORED_KEYS)
    assert all(row.help for row in rows.values())
    parsed = load_config(None, environ={})  # what a section without the key gets
    for key in keys - {"retriever.url"}:
        section, _, name = key.rpartition(".")
        value = getattr(parsed.retriever if section else parsed, name)
        assert rows[key].default == shown(value), key
    assert rows["retriever.url"].default == DEFAULT_RETRIEVER_URL == parsed.retriever.urls[0]
