"""The CPU recipes start a Ray instance of their own beside a cluster that ``ray start`` runs on the same
machine, and beside the address file a dead one left (issue 24: ``main_ppo +recipe=ragr1_cpu`` and
``ragr1-verl-demo`` joined it and failed with ``ValueError: When connecting to an existing cluster, num_cpus
and num_gpus must not be provided``). ``ray.init`` is called with the composed recipe's ``ray_init`` as
verl's ``main_ppo`` calls it; the full ``main_ppo`` run is ``test_main_ppo_cpu.py``."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from ragr1_verl.cpu import warn_about_ray_address
from tests.ray_cluster import alive, ray_start_cluster

PROBE = textwrap.dedent("""
    import json, os, sys
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf
    import ray

    with initialize_config_module("verl.trainer.config", version_base=None):
        config = compose("ppo_trainer", overrides=["+recipe=ragr1_cpu"])
    kwargs = OmegaConf.to_container(config.ray_kwargs.ray_init)
    kwargs.pop("runtime_env")  # verl merges its own into it; not what is checked here
    seen = []
    for folder in sys.argv[1:]:
        os.environ["RAY_TMPDIR"] = folder
        ray.init(include_dashboard=False, **kwargs)  # as main_ppo: ray.init(**ray_kwargs.ray_init)
        resources = ray.cluster_resources()
        seen.append({"gcs": ray.get_runtime_context().gcs_address, "cpus": resources.get("CPU"),
                     "gpus": resources.get("GPU"), "answer": ray.get(ray.remote(lambda: 42).remote())})
        ray.shutdown()
    print(json.dumps(seen))
""")


@pytest.mark.slow
def test_the_cpu_recipe_starts_its_own_ray_beside_a_running_cluster_and_a_stale_address_file():
    # Short: Ray's unix socket paths under RAY_TMPDIR must stay below 108 characters.
    stale = Path(tempfile.mkdtemp(prefix="ragr1-stale-", dir="/tmp"))
    (stale / "ray").mkdir()
    (stale / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")  # a cluster that died long ago
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, stale, ignore_errors=True)
        cluster = cleanup.enter_context(ray_start_cluster(num_cpus=1))
        result = subprocess.run([sys.executable, "-c", PROBE, str(cluster.tmp), str(stale)], env=cluster.env(),
                                capture_output=True, text=True, timeout=300, check=False)
        assert {"gcs_server", "raylet"} <= {p.name() for p in alive(cluster.processes())}, "the cluster is touched"
    assert result.returncode == 0, result.stderr[-4000:]
    beside_cluster, beside_stale_file = json.loads(result.stdout.strip().splitlines()[-1])
    assert beside_cluster["gcs"] != cluster.address, "joined the `ray start` cluster"
    for seen in (beside_cluster, beside_stale_file):
        assert (seen["cpus"], seen["gpus"], seen["answer"]) == (16.0, 1.0, 42), seen


def test_a_deliberate_ray_address_is_explained_before_rays_value_error():
    argv = ["main_ppo", "+recipe=ragr1_cpu"]
    message = warn_about_ray_address(argv, {"RAY_ADDRESS": "10.0.0.1:6379"})
    assert message and "~ray_kwargs.ray_init.num_cpus ~ray_kwargs.ray_init.num_gpus" in message
    assert warn_about_ray_address(argv, {"RAY_ADDRESS": "local"}) is None
    assert warn_about_ray_address(argv, {}) is None
    assert warn_about_ray_address([*argv, "~ray_kwargs.ray_init.num_cpus", "~ray_kwargs.ray_init.num_gpus"],
                                  {"RAY_ADDRESS": "auto"}) is None
    assert warn_about_ray_address(["sft_trainer", "trainer.x=1"], {"RAY_ADDRESS": "auto"}) is None
