"""Fixtures of the CPU-backend tests: the tiny offline Qwen2 folder with random weights saved."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ragr1_verl.fakes import build_tiny_qwen2


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """:func:`build_tiny_qwen2` plus random weights, so that ``from_pretrained`` (verl's actor) can load it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    build_tiny_qwen2(folder)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_with_weights(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-weights"))
