"""Run prompts through verl's real ``AgentLoopWorker`` configured by the composed ``ppo_trainer`` config."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def shipped_config(name: str) -> str:
    """A YAML of ``ragr1_verl/configs`` as a recipe would name it: relative to ``site-packages`` where verl's
    ``resolve_config_path`` finds it (a regular install), else absolute (an editable install)."""
    import ragr1_verl
    from ragr1_verl.verl_compat import resolve_config_path

    relative = f"ragr1_verl/configs/{name}"
    try:
        resolve_config_path(relative)
        return relative
    except (FileNotFoundError, ValueError):
        return str(Path(ragr1_verl.__file__).parent / "configs" / name)


def compose_trainer_config(model_dir: Path, *, ragr1: dict | None = None, prompt_length: int = 512,
                           response_length: int = 1024, agent_loop_yaml: bool = True,
                           overrides: Sequence[str] = ()) -> Any:
    """verl's real trainer config, as ``main_ppo`` composes it, with the plugin's agent loop selected
    (registered through the agent-loop YAML, or with ``agent_loop_yaml=False`` by the entry point alone)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf, open_dict

    agent_loop_yaml_path = shipped_config("agent_loop.yaml")
    registration = [f"actor_rollout_ref.rollout.agent.agent_loop_config_path={agent_loop_yaml_path}"] * agent_loop_yaml
    with initialize_config_module("verl.trainer.config", version_base=None):
        config = compose("ppo_trainer", overrides=[
            f"actor_rollout_ref.model.path={model_dir}",
            "actor_rollout_ref.rollout.name=vllm",
            f"actor_rollout_ref.rollout.prompt_length={prompt_length}",
            f"actor_rollout_ref.rollout.response_length={response_length}",
            *registration,
            "actor_rollout_ref.rollout.agent.default_agent_loop=ragr1_agent",
            *overrides,
        ])
    if ragr1 is not None:
        with open_dict(config):
            config.ragr1 = OmegaConf.create(ragr1)
    return config


@dataclass
class Trajectory:
    """One row of the worker's output batch, unpadded."""

    prompt_ids: list[int]
    response_ids: list[int]
    response_mask: list[int]
    logprobs: list[float]
    extra: dict[str, Any]

    def spans(self) -> list[tuple[int, list[int]]]:
        """The response as runs of equal mask: [(mask, ids), ...]."""
        runs: list[tuple[int, list[int]]] = []
        for token, mask in zip(self.response_ids, self.response_mask):
            if runs and runs[-1][0] == mask:
                runs[-1][1].append(token)
            else:
                runs.append((mask, [token]))
        return runs


def batch_of(prompts: Sequence[str], extra_infos: Sequence[dict] | None = None, **columns: Sequence[Any]):
    """A batch as RLHFDataset makes it; extra ``columns`` reach ``run()`` as keyword arguments."""
    from verl.protocol import DataProto

    count = len(prompts)
    raw_prompts = np.empty(count, dtype=object)
    raw_prompts[:] = [[{"role": "user", "content": prompt}] for prompt in prompts]
    return DataProto.from_dict(non_tensors={
        "raw_prompt": raw_prompts,
        "index": np.arange(count),
        "extra_info": np.array(list(extra_infos or [{} for _ in prompts]), dtype=object),
        "data_source": np.array(["test"] * count, dtype=object),
        **{name: np.array(list(values), dtype=object) for name, values in columns.items()},
    })


async def generate(config: Any, make_llm, prompts: Sequence[str], extra_infos: Sequence[dict] | None = None,
                   **columns: Sequence[Any]):
    """Build the worker inside the running loop (verl captures it), run the batch, unpad the rows."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    from ragr1_verl.retrieval_client import close_shared_clients

    worker = AgentLoopWorker(config, llm_client=None)
    worker.llm_client = llm = make_llm(worker.tokenizer)
    try:
        output = await worker.generate_sequences(batch_of(prompts, extra_infos, **columns))
    finally:
        await close_shared_clients()
    return worker.tokenizer, llm, unpad(output, int(config.actor_rollout_ref.rollout.prompt_length))


def unpad(output, prompt_length: int) -> list[Trajectory]:
    rows = []
    for row in range(len(output)):
        attention = output.batch["attention_mask"][row].bool()
        prompt_keep, response_keep = attention[:prompt_length], attention[prompt_length:]
        extra = {key: values[row] for key, values in output.non_tensor_batch.items()
                 if key.startswith("ragr1/") or key.endswith("_global_steps")}
        rows.append(Trajectory(
            prompt_ids=output.batch["prompts"][row][prompt_keep].tolist(),
            response_ids=output.batch["responses"][row][response_keep].tolist(),
            response_mask=output.batch["response_mask"][row][response_keep].tolist(),
            logprobs=output.batch["rollout_log_probs"][row][response_keep].tolist(),
            extra=extra,
        ))
    return rows


def run(config: Any, make_llm, prompts: Sequence[str], extra_infos: Sequence[dict] | None = None,
        **columns: Sequence[Any]):
    return asyncio.run(generate(config, make_llm, prompts, extra_infos, **columns))
