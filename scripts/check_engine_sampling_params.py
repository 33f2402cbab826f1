"""Check the rollout's generation request against the released vLLM and SGLang that verl 0.9 pins.

vLLM and SGLang install only with CUDA, so their wheels are downloaded (``pip download --no-deps``) and
read, never imported. From each wheel the script takes the names ``SamplingParams`` accepts (vLLM: the
msgspec struct's fields; SGLang: ``SamplingParams.__init__``'s arguments) and writes them, with the wheel
names and sha256, to ``tests/data/engine_sampling_params.json``. ``tests/ragr1_verl/
test_engine_sampling_params.py`` then checks, in CI, every key the agent loop sends (after verl's own
server translation) against that file. Rerun it when verl moves to other engine versions.

    python scripts/check_engine_sampling_params.py               # download, extract, write
    python scripts/check_engine_sampling_params.py --wheels DIR  # wheels already downloaded there
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger("check_engine_sampling_params")
ENGINES = {  # the versions of verl 0.9.1's `vllm` and `sglang` extras
    "vllm": ("vllm==0.24.0", "vllm/sampling_params.py"),
    "sglang": ("sglang==0.5.12", "sglang/srt/sampling/sampling_params.py"),
}
SNAPSHOT = Path(__file__).resolve().parents[1] / "tests" / "data" / "engine_sampling_params.json"


def accepted_names(source: str) -> list[str]:
    """The keyword names ``SamplingParams(...)`` accepts: an ``__init__``'s arguments, else the class's
    annotated fields (a dataclass or msgspec struct), public ones only."""
    tree = ast.parse(source)
    [cls] = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "SamplingParams"]
    init = next((node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__"), None)
    if init is not None:
        names = [arg.arg for arg in init.args.args[1:] + init.args.kwonlyargs]
    else:
        names = [node.target.id for node in cls.body
                 if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]
    return sorted(name for name in names if not name.startswith("_"))


def wheel_for(requirement: str, folder: Path) -> Path:
    name = requirement.split("==")[0]
    found = sorted(folder.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), requirement],
                       check=True)
        found = sorted(folder.glob(f"{name}-*.whl"))
    return found[-1]


def snapshot(folder: Path) -> dict:
    engines = {}
    for engine, (requirement, member) in ENGINES.items():
        wheel = wheel_for(requirement, folder)
        with zipfile.ZipFile(wheel) as archive:
            source = archive.read(member).decode("utf-8")
        engines[engine] = {"requirement": requirement, "wheel": wheel.name, "file": member,
                           "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
                           "accepted": accepted_names(source)}
        logger.info("%s: %d names accepted by SamplingParams (%s)", wheel.name, len(engines[engine]["accepted"]),
                    member)
    return engines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, default=None, help="folder with (or for) the downloaded wheels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as scratch:
        engines = snapshot(args.wheels or Path(scratch))
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(json.dumps(engines, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s; now run: python -m pytest tests/ragr1_verl/test_engine_sampling_params.py", SNAPSHOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
