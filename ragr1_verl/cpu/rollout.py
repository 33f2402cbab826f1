"""The ``hf_cpu`` rollout: a transformers generation server as a verl rollout replica.

verl splits a rollout backend in three, and so does this module:

- :class:`CPUGenerationServer`, a Ray actor (one per replica) that holds the model and answers verl's
  token-in/token-out ``generate`` (batched by :class:`~ragr1_verl.cpu.generation.TransformersGenerator`), takes
  weight updates, and implements the lifecycle calls verl makes on rollout servers (sleep, wake-up, KV-cache
  release, abort, profiling), most of which have nothing to do on a CPU;
- :class:`CPUReplica`, the ``RolloutReplica`` that verl's ``LLMServerManager`` creates and that launches the
  server next to the trainer worker it serves;
- :class:`CPUServerAdapter`, the ``BaseRollout`` verl builds inside each trainer worker: it receives the
  trainer's weights after every step and sends them to the server.

The server keeps float32 weights whatever the trainer's dtype: CPU kernels are fastest there, and its
log-probabilities then match the actor's recomputation closely (verl's ``rollout_probs_diff`` metrics).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import ray
import torch

from ragr1_verl.cpu.generation import Generation, SamplingSettings, TransformersGenerator
from ragr1_verl.verl_compat import BaseRollout, RolloutReplica, TokenOutput

logger = logging.getLogger(__name__)

BATCH_WAIT_S = 0.02  # how long a first request waits for the other trajectories' requests of the same round


def server_actor_name(rollout_name: str, replica_rank: int, node_rank: int = 0, role: str = "",
                      suffix: str = "") -> str:
    """The Ray actor name of a replica's server, as verl names its vLLM servers (the adapter looks it up)."""
    role = f"{role}_" if role else ""
    return f"{rollout_name}_server_{role}{replica_rank}_{node_rank}{suffix}"


class CPUGenerationServer:
    """Holds one model copy and generates for every agent-loop worker (run as an async Ray actor)."""

    def __init__(self, model_path: str, *, default_max_tokens: int, seed: int = 0,
                 trust_remote_code: bool = False, max_batch_size: int = 64, batch_wait_s: float = BATCH_WAIT_S):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa",
                                                     trust_remote_code=trust_remote_code)
        self.generator = TransformersGenerator(model, tokenizer, seed=seed)
        self.default_max_tokens = default_max_tokens
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.global_steps = 0  # the trainer step whose weights are loaded; verl's staleness metrics need it
        self.weight_updates = 0
        self.sleeping = False
        self._model_lock = threading.Lock()  # generation (in a thread) and weight loading never overlap
        self._pending: list[tuple[list[int], SamplingSettings, asyncio.Future]] = []
        self._has_work: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None

    # -- generation ----------------------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], sampling_params: Mapping[str, Any], request_id: str | None = None,
                       image_data: Any = None, video_data: Any = None, **kwargs: Any) -> TokenOutput:
        """verl's token-in/token-out call; extra keyword arguments from newer verl clients are ignored."""
        if image_data or video_data or kwargs.get("audio_data"):
            raise NotImplementedError("the hf_cpu rollout generates text only")
        settings = SamplingSettings.from_request(sampling_params, self.default_max_tokens)
        future = asyncio.get_running_loop().create_future()
        self._pending.append((list(prompt_ids), settings, future))
        self._start_batcher().set()
        generation: Generation = await future
        return TokenOutput(token_ids=generation.token_ids,
                           log_probs=generation.log_probs if settings.logprobs else None,
                           stop_reason="aborted" if generation.finish_reason == "abort" else "completed",
                           extra_fields={"global_steps": self.global_steps})

    def _start_batcher(self) -> asyncio.Event:
        if self._has_work is None:
            self._has_work = asyncio.Event()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.get_running_loop().create_task(self._run_batches())
        return self._has_work

    async def _run_batches(self) -> None:
        while True:
            await self._has_work.wait()
            await asyncio.sleep(self.batch_wait_s)
            batch, self._pending = self._pending[:self.max_batch_size], self._pending[self.max_batch_size:]
            if not self._pending:
                self._has_work.clear()
            if not batch:
                continue
            prompts, settings, futures = zip(*batch, strict=True)
            try:
                results = await asyncio.to_thread(self._generate_locked, list(prompts), list(settings))
            except Exception as error:  # every waiting request gets the failure, the server keeps serving
                logger.exception("hf_cpu generation failed for a batch of %d requests", len(batch))
                results = [error] * len(batch)
            for future, result in zip(futures, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _generate_locked(self, prompts: list[list[int]], settings: list[SamplingSettings]) -> list[Generation]:
        with self._model_lock:
            return self.generator.generate(prompts, settings)

    # -- weights -------------------------------------------------------------------------------------------

    async def update_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                             global_steps: int | None = None) -> int:
        """Copy the trainer's tensors into the model by HF parameter name; returns how many were loaded."""
        items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        loaded = await asyncio.to_thread(self._load_locked, items)
        self.weight_updates += 1
        if global_steps is not None:
            self.global_steps = global_steps
        return loaded

    def _load_locked(self, items: list[tuple[str, torch.Tensor]]) -> int:
        with self._model_lock, torch.no_grad():
            targets = self.generator.model.state_dict(keep_vars=True)  # tied weights appear under both names
            unknown = [name for name, _ in items if name not in targets]
            if unknown:
                raise KeyError(f"the trainer sent weights the rollout model does not have: {unknown[:5]}")
            for name, tensor in items:
                target = targets[name]
                if target.shape != tensor.shape:
                    raise ValueError(f"weight {name}: trainer shape {tuple(tensor.shape)}, "
                                     f"rollout shape {tuple(target.shape)}")
                target.data.copy_(tensor)
        return len(items)

    def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    def get_state(self) -> dict[str, Any]:
        """For tests and logs: weight updates received, last global step, sleeping or not."""
        return {"weight_updates": self.weight_updates, "global_steps": self.global_steps, "sleeping": self.sleeping}

    # -- lifecycle: verl frees and restores GPU memory around weight syncs; on a CPU there is nothing to free --

    async def wake_up(self, tags: list[str] | None = None) -> None:
        self.sleeping = False

    async def sleep(self) -> None:
        self.sleeping = True

    async def abort_all_requests(self, reject_request: bool = False) -> dict[str, Any]:
        """Finish the requests still waiting for a batch as aborted; a batch already decoding completes."""
        waiting, self._pending = self._pending, []
        for _, _, future in waiting:
            if not future.done():
                future.set_result(Generation(finish_reason="abort"))
        return {"aborted": len(waiting)}

    async def resume_generation(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None  # caches live for one batch only

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def wait_for_requests_to_drain(self) -> None:
        while self._pending or (self._has_work is not None and self._has_work.is_set()):
            await asyncio.sleep(0.01)
        with self._model_lock:  # a batch in flight holds it
            pass

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

    def ready(self) -> bool:
        return True

    async def close(self) -> None:
        """Stop the batching task (tests; a Ray actor just ends with its process)."""
        await self.abort_all_requests()
        if self._batcher is not None:
            self._batcher.cancel()
            await asyncio.gather(self._batcher, return_exceptions=True)
            self._batcher = None


class CPUReplica(RolloutReplica):
    """A replica of one :class:`CPUGenerationServer`, placed on the node of the trainer worker it serves."""

    async def launch_servers(self):
        if self.world_size != 1:
            raise ValueError("the hf_cpu rollout runs one unsharded model per replica: set rollout "
                             "tensor/data/pipeline_model_parallel_size to 1 (more trainer ranks give more replicas)")
        role = "reward" if self.is_reward_model else "teacher" if self.is_teacher_model else ""
        name = server_actor_name(self.config.name, self.replica_rank, 0, role, self.name_suffix)
        options: dict[str, Any] = {"name": name, "num_cpus": 0, "max_concurrency": self.max_concurrency}
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False)
        server = ray.remote(CPUGenerationServer).options(**options).remote(
            _model_path(self.model_config), default_max_tokens=int(self.config.response_length),
            seed=int(getattr(self.config, "seed", 0) or 0),
            trust_remote_code=bool(self.model_config.get("trust_remote_code", False)))
        await server.ready.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"{self.config.name}://{name}"  # an id for verl's load balancer; no HTTP here


def _model_path(model_config: Any) -> str:
    """The model folder of verl's model config (an ``HFModelConfig``, or the DictConfig it is built from)."""
    path = getattr(model_config, "local_path", None) or model_config.get("path")
    return os.path.expanduser(str(path))


class CPUServerAdapter(BaseRollout):
    """The trainer-side end of the ``hf_cpu`` rollout: forwards weights and memory calls to the server."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs: Any):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", "0"))
        replica_world_size = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                              * self.config.pipeline_model_parallel_size)
        self.replica_rank = rank // replica_world_size if replica_rank == -1 else replica_rank
        self.is_leader = rank % replica_world_size == 0  # the rank that talks to the replica's server
        self._server = None

    def _server_handle(self):
        if self._server is None:  # the server starts after the trainer workers: look it up on first use
            self._server = ray.get_actor(server_actor_name(self.config.name, self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        if self.is_leader:
            await self._server_handle().wake_up.remote(tags=tags)

    async def release(self):
        if self.is_leader:
            await self._server_handle().sleep.remote()

    @torch.no_grad()
    async def update_weights(self, weights, wire_format: str = "named_tensors", global_steps: int | None = None,
                             **kwargs: Any):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"the hf_cpu rollout takes full named tensors, not {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise NotImplementedError("the hf_cpu rollout does not load LoRA adapters; set model.lora.merge=true")
        # Every rank drains the generator: producing each full tensor is a collective over the FSDP shards.
        state = {}
        for name, tensor in weights:
            if self.is_leader:
                state[name] = tensor.detach().to("cpu", copy=True)
        if self.is_leader:
            loaded = await self._server_handle().update_weights.remote(state, global_steps)
            logger.debug("hf_cpu replica %d: %d tensors loaded", self.replica_rank, loaded)
