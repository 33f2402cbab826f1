"""``MultiQuerySearchTool``: RAG-R1's multi-query search as a verl tool, for verl's stock ``tool_agent`` loop.

The model calls ``search`` once with a list of queries (hermes tool calls: ``{"name": "search",
"arguments": {"query_list": ["q1", "q2"]}}``); the tool sends them to the retriever in one request
through the same shared client as ``ragr1_agent`` and returns one text with the documents of every query.
Its ``config:`` in the tool YAML takes the keys of the ``ragr1:`` section (``retriever``, ``topk``,
``max_queries_per_search``, ``observation_format``, ...). There is no tokenizer here, so
``max_obs_tokens_per_query`` is not applied: verl's ``multi_turn.max_tool_response_length`` (characters)
caps the text instead.
"""

from __future__ import annotations

import logging
from typing import Any

from ragr1_verl.config import load_config
from ragr1_verl.protocol.actions import Queries, clean_queries, split_queries
from ragr1_verl.protocol.observation import invalid_search, retrieval_failed_text
from ragr1_verl.retrieval_client import shared_client
from ragr1_verl.verl_compat import BaseTool, OpenAIFunctionToolSchema, ToolResponse, rollout_trace_op

logger = logging.getLogger(__name__)

QUERY_LIST_DESCRIPTION = (
    "A list of strings: one to {max_queries} search queries, each about one thing you need to know. "
    "All of them are searched at once."
)


def default_tool_schema(max_queries: int) -> OpenAIFunctionToolSchema:
    """The schema used when the tool YAML gives none. verl's schema model has no ``items``, so the element
    type is stated in the description."""
    return OpenAIFunctionToolSchema.model_validate({
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search an encyclopedia with several queries in one call; returns the top passages "
                           "for each query.",
            "parameters": {
                "type": "object",
                "properties": {"query_list": {"type": "array",
                                              "description": QUERY_LIST_DESCRIPTION.format(max_queries=max_queries)}},
                "required": ["query_list"],
            },
        },
    })


class MultiQuerySearchTool(BaseTool):
    """Multi-query search over the project's retriever server (or any Search-R1-compatible ``/retrieve``)."""

    def __init__(self, config: dict[str, Any], tool_schema: OpenAIFunctionToolSchema | None = None):
        self.settings = load_config(config)
        super().__init__(config, tool_schema or default_tool_schema(self.settings.max_queries_per_search))

    @rollout_trace_op
    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
                      ) -> tuple[ToolResponse, float, dict[str, Any]]:
        queries = self._queries(parameters)
        metrics: dict[str, Any] = {"queries": len(queries.queries), "duplicates_removed": queries.duplicates_removed,
                                   "queries_dropped": queries.dropped_over_cap}
        if queries.error is not None:
            return ToolResponse(text=invalid_search(queries.error).strip()), 0.0, metrics
        result = await shared_client(self.settings.retriever).search(queries.queries, self.settings.topk)
        metrics["retrieval_ms"] = result.elapsed_ms
        if not result.ok:
            logger.warning("retrieval failed: %s", result.error)
            metrics["retrieval_failed"] = True
            return ToolResponse(text=retrieval_failed_text(result.error or "unknown error")), 0.0, metrics
        text = self.settings.observation_renderer().body(queries.queries, result.documents)
        return ToolResponse(text=text), 0.0, metrics

    def _queries(self, parameters: dict[str, Any]) -> Queries:
        """``query_list`` as a list of strings; a single string is split like a ``<search>`` tag's content."""
        value = parameters.get("query_list", parameters.get("queries", parameters.get("query")))
        if isinstance(value, str):
            return split_queries(value, self.settings.query_rules)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            return Queries((), error="'query_list' must be a list of strings")
        if self.settings.mode == "sq":
            value = value[:1]
        return clean_queries(value, self.settings.query_rules)
