"""Where a query encoder's forward pass runs: the fp32 torch reference, or a faster backend.

A backend turns a tokenized batch (numpy arrays by input name) into pooled, optionally L2-normalised float32
vectors. Every backend pools with the one :class:`PooledEncoder`, so they differ only in arithmetic:

- ``torch``: fp32 PyTorch (fp16 on a GPU), the reference: an index is built with it.
- ``torch-bf16``: bfloat16 weights and activations. Fast only on CPUs with bf16 units (AVX512-BF16, AMX);
  elsewhere PyTorch emulates it and it is slower than fp32.
- ``torch-int8``: PyTorch's dynamic int8 quantisation of the linear layers (weights int8, activations
  quantised per batch).
- ``onnx``: the same fp32 graph exported to ONNX and run by ONNX Runtime (``pip install ragr1-verl[onnx]``).
- ``onnx-int8``: that graph with ONNX Runtime's dynamic int8 quantisation of its matrix multiplications.

Lower precision changes the vectors a little, and so sometimes the ranking: whether a backend keeps the
fp32 top-k on an index is measured, not assumed (:mod:`retriever_server.encoder_choice`, and
``benchmarks/bench_encoders.py``). ONNX models are exported once per model folder and cached under the cache
folder (``$RAGR1_CACHE_DIR/encoders``); no file is ever unpickled.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from retriever_server.cpus import cpu_flags
from retriever_server.environment import cache_root

logger = logging.getLogger(__name__)

REFERENCE_BACKEND = "torch"
ENCODER_BACKENDS = ("torch", "torch-bf16", "torch-int8", "onnx", "onnx-int8")
AUTO_BACKEND = "auto"
ONNX_OPSET = 17


class Forward(Protocol):
    """A tokenized batch (``input_ids``, ``attention_mask`` and maybe ``token_type_ids``) -> ``[n, dim]``."""

    def __call__(self, batch: Mapping[str, np.ndarray]) -> np.ndarray: ...


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> tuple[str, ...]:
    """The backends this installation can run (the ONNX ones need onnxruntime and onnx)."""
    return tuple(name for name in ENCODER_BACKENDS if not name.startswith("onnx") or onnx_available())


def cpu_has_bf16_units() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), from Linux's CPU flags; elsewhere
    PyTorch's own check."""
    flags = cpu_flags()
    if flags is not None:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def auto_candidates() -> tuple[str, ...]:
    """What ``auto`` measures: every backend that can run, but bf16 only where the CPU has bf16 units (it is
    several times slower than fp32 elsewhere, and measuring it would only slow the start)."""
    return tuple(name for name in available_backends() if name != "torch-bf16" or cpu_has_bf16_units())


def check_backend(name: str) -> None:
    """Raise ValueError naming the choices, or what to install, for a backend that cannot run here."""
    if name not in (*ENCODER_BACKENDS, AUTO_BACKEND):
        raise ValueError(f"unknown encoder backend {name!r}; choose one of "
                         f"{', '.join((AUTO_BACKEND, *ENCODER_BACKENDS))}")
    if name.startswith("onnx") and not onnx_available():
        raise ValueError(f"the {name} encoder backend needs ONNX Runtime: pip install 'ragr1-verl[onnx]'")


def _pooled_encoder_class():
    import torch

    class PooledEncoder(torch.nn.Module):
        """A transformers encoder with its pooling (and normalisation) in the graph: what every backend runs."""

        def __init__(self, model: torch.nn.Module, pooling: str, normalize: bool):
            super().__init__()
            self.model, self.pooling, self.normalize = model, pooling, normalize

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = pooled.float()
            return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    return PooledEncoder


def pooled_encoder(model_dir: str, pooling: str, normalize: bool):
    """The model of ``model_dir`` in fp32 with its pooling, in eval mode."""
    from transformers import AutoModel

    return _pooled_encoder_class()(AutoModel.from_pretrained(model_dir), pooling, normalize).eval()


class TorchForward:
    """A :class:`PooledEncoder` in PyTorch on ``device``: fp32, fp16 (GPU), bf16, or dynamic int8 (CPU)."""

    def __init__(self, module, device: str, precision: str = "fp32"):
        import torch

        self._torch = torch
        self.device = torch.device(device)
        if precision == "int8":
            if self.device.type != "cpu":
                raise ValueError("the torch-int8 encoder backend runs on the CPU only")
            quantization = torch.ao.quantization
            # per output channel, as onnx-int8: per-tensor scales cost MiniLM ~0.05 of cosine to fp32
            module = quantization.quantize_dynamic(
                module, {torch.nn.Linear: quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
        elif precision in ("fp16", "bf16"):
            module = module.to(torch.float16 if precision == "fp16" else torch.bfloat16)
        self.module = module.to(self.device).eval()

    def __call__(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        tensors = {name: torch.from_numpy(array).to(self.device) for name, array in batch.items()}
        with torch.inference_mode():
            return self.module(**tensors).cpu().numpy()


class OnnxForward:
    """An exported :class:`PooledEncoder` in ONNX Runtime on the CPU, with ``threads`` intra-op threads."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [item.name for item in self.session.get_inputs()]

    def __call__(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        feed = {name: np.ascontiguousarray(batch[name], dtype=np.int64) for name in self.inputs}
        return self.session.run(None, feed)[0]


def make_forward(backend: str, model_dir: str, pooling: str, normalize: bool, *, device: str,
                 input_names: tuple[str, ...], threads: int, fp16: bool) -> Forward:
    """The forward pass of ``backend`` for the model of ``model_dir`` (``device`` is torch's)."""
    check_backend(backend)
    if backend.startswith("onnx"):
        if not device.startswith("cpu"):
            raise ValueError(f"the {backend} encoder backend runs on the CPU; use --encoder-device cpu")
        path = onnx_model(model_dir, pooling, normalize, input_names, int8=backend == "onnx-int8")
        return OnnxForward(path, threads)
    precision = {"torch": "fp16" if fp16 else "fp32", "torch-bf16": "bf16", "torch-int8": "int8"}[backend]
    return TorchForward(pooled_encoder(model_dir, pooling, normalize), device, precision)


# -- ONNX export ------------------------------------------------------------------------------------------

def onnx_cache_dir(model_dir: str, pooling: str, normalize: bool, input_names: tuple[str, ...]) -> Path:
    """One folder per model folder (its path and its weight files' sizes and times) and pooling."""
    digest = hashlib.sha256(f"{Path(model_dir).resolve()}\0{pooling}\0{normalize}\0{input_names}".encode())
    for weights in sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    config = Path(model_dir, "config.json")
    if config.is_file():
        digest.update(config.read_bytes())
    return cache_root() / "encoders" / f"{Path(model_dir).name}-{digest.hexdigest()[:16]}"


def onnx_model(model_dir: str, pooling: str, normalize: bool, input_names: tuple[str, ...], *,
               int8: bool) -> Path:
    """The cached ONNX file of the model (exported on first use), or its int8 quantisation."""
    folder = onnx_cache_dir(model_dir, pooling, normalize, input_names)
    fp32, quantized = folder / "model.onnx", folder / "model-int8.onnx"
    with _locked(folder):
        if not fp32.is_file():
            logger.info("exporting %s to ONNX (once) in %s", model_dir, folder)
            with _published(fp32) as staging:
                _in_child("export", model_dir, pooling, str(normalize), ",".join(input_names), str(staging))
        if int8 and not quantized.is_file():
            logger.info("quantising the ONNX encoder to int8 (once) in %s", folder)
            with _published(quantized) as staging:
                _in_child("quantize", str(fp32), str(staging))
    return quantized if int8 else fp32


def _in_child(*argv: str) -> None:
    """Export or quantise in a child process: the ``onnx`` package and the exporter never load into the
    serving process (onnx's protobuf objects have crashed other processes at exit beside torch and Ray)."""
    result = subprocess.run([sys.executable, "-m", __name__, *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ONNX {argv[0]} failed (exit code {result.returncode}): {result.stderr[-2000:]}")


def _child_main(argv: list[str]) -> int:
    if argv[0] == "export":
        model_dir, pooling, normalize, names, path = argv[1:]
        export_onnx(pooled_encoder(model_dir, pooling, normalize == "True"), tuple(names.split(",")), Path(path))
    else:
        quantize_onnx(Path(argv[1]), Path(argv[2]))
    return 0


def export_onnx(module, input_names: tuple[str, ...], path: Path) -> None:
    """``module`` (a :class:`PooledEncoder`) as an ONNX graph with dynamic batch and sequence axes."""
    import torch

    example = {name: torch.ones((2, 8), dtype=torch.int64) for name in input_names}
    if "token_type_ids" in example:
        example["token_type_ids"] = torch.zeros((2, 8), dtype=torch.int64)
    order = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in example]
    axes = {name: {0: "batch", 1: "sequence"} for name in order}
    with torch.no_grad():
        torch.onnx.export(module, tuple(example[name] for name in order), str(path), input_names=order,
                          output_names=["embedding"], dynamic_axes={**axes, "embedding": {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)


def quantize_onnx(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation: int8 weights per output channel, activations per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One exporter at a time per model (several replicas may start at once)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _published(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed to it on success and removed on failure."""
    handle, name = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".onnx", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
