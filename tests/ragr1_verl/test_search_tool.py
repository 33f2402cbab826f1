"""MultiQuerySearchTool: loaded by verl's tool registry, driven by verl's stock tool_agent with hermes calls."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml
from verl.tools.tool_registry import initialize_tools_from_config

from ragr1_verl.retrieval_client import close_shared_clients
from ragr1_verl.search_tool import MultiQuerySearchTool
from ragr1_verl.verl_compat import resolve_config_path
from tests.ragr1_verl.fakes import ScriptedLLM, scripted
from tests.ragr1_verl.rollout import compose_trainer_config, run, shipped_config


def tool_yaml(tmp_path, retriever, **config) -> str:
    with open(resolve_config_path(shipped_config("tool_config.yaml"))) as handle:
        shipped = yaml.safe_load(handle)
    shipped["tools"][0]["config"].update({"retriever": {"url": retriever.url, "max_retries": 0}, **config})
    path = tmp_path / "tools.yaml"
    path.write_text(yaml.safe_dump(shipped))
    return str(path)


def execute(tool: MultiQuerySearchTool, parameters: dict):
    async def go():
        try:
            return await tool.execute("instance", parameters)
        finally:
            await close_shared_clients()

    return asyncio.run(go())


def test_shipped_yaml_loads_with_a_list_of_strings_schema(tmp_path, retriever):
    [tool] = initialize_tools_from_config(tool_yaml(tmp_path, retriever))

    assert isinstance(tool, MultiQuerySearchTool) and tool.name == "search"
    schema = tool.get_openai_tool_schema().model_dump(exclude_none=True)
    query_list = schema["function"]["parameters"]["properties"]["query_list"]
    assert query_list["type"] == "array" and "list of strings" in query_list["description"]
    assert schema["function"]["parameters"]["required"] == ["query_list"]


def test_execute_sends_one_request_and_returns_every_querys_documents(tmp_path, retriever):
    [tool] = initialize_tools_from_config(tool_yaml(tmp_path, retriever))
    response, reward, metrics = execute(tool, {"query_list": ["Eiffel Tower", "Paris", "Eiffel Tower"]})

    assert retriever.requests == [{"queries": ["Eiffel Tower", "Paris"], "topk": 3, "return_scores": False}]
    body = json.loads(response.text)
    assert body["query"] == ["Eiffel Tower", "Paris"]
    assert body["documents"][1].startswith('Doc 1: "Paris 1"')
    assert reward == 0.0 and metrics["queries"] == 2 and metrics["duplicates_removed"] == 1


@pytest.mark.parametrize("parameters, message", [
    ({"query_list": [1, 2]}, "list of strings"),
    ({"query_list": []}, "no query"),
    ({}, "list of strings"),
])
def test_bad_arguments_get_an_explanation_not_an_exception(tmp_path, retriever, parameters, message):
    [tool] = initialize_tools_from_config(tool_yaml(tmp_path, retriever))
    response, _, _ = execute(tool, parameters)

    assert message in response.text and retriever.requests == []


def test_a_string_argument_is_split_like_a_search_tag(tmp_path, retriever):
    [tool] = initialize_tools_from_config(tool_yaml(tmp_path, retriever))
    execute(tool, {"query_list": "Eiffel Tower, Paris"})

    assert retriever.requests[0]["queries"] == ["Eiffel Tower", "Paris"]


def test_retrieval_failure_is_reported_in_the_tool_response(tmp_path, retriever):
    retriever.failures_left = 1
    [tool] = initialize_tools_from_config(tool_yaml(tmp_path, retriever))
    response, _, metrics = execute(tool, {"query_list": ["Paris"]})

    assert "search failed" in response.text and metrics["retrieval_failed"]


def test_stock_tool_agent_with_hermes_calls_the_tool_once_for_all_queries(tiny_model_dir, tmp_path, retriever):
    call = {"name": "search", "arguments": {"query_list": ["Eiffel Tower", "Paris", "Gustave Eiffel"]}}
    script = scripted({"Where is it?": [f"<tool_call>\n{json.dumps(call)}\n</tool_call>",
                                        "<answer> Paris </answer><|im_end|>"]})
    config = compose_trainer_config(tiny_model_dir, overrides=[
        "actor_rollout_ref.rollout.agent.default_agent_loop=tool_agent",
        f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tool_yaml(tmp_path, retriever)}",
        "actor_rollout_ref.rollout.multi_turn.format=hermes",
        "actor_rollout_ref.rollout.multi_turn.max_tool_response_length=8192",
    ])
    tokenizer, llm, [row] = run(config, lambda tok: ScriptedLLM(tok, script), ["Where is it?"])

    assert [request["queries"] for request in retriever.requests] == [["Eiffel Tower", "Paris", "Gustave Eiffel"]]
    assert len(llm.calls) == 2
    tool_text = tokenizer.decode([token for token, mask in zip(row.response_ids, row.response_mask) if not mask])
    assert '"Doc 1: \\"Gustave Eiffel 1\\"' in tool_text
    assert tokenizer.decode(row.response_ids).rstrip().endswith("<answer> Paris </answer><|im_end|>")
