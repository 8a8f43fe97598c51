"""What every benchmark records about the machine and the code it ran, and where results go."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import numba
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": model, "amx": "amx_bf16" in flags, "threads": numba.get_num_threads(), "gpu": gpu,
            "host": platform.node(), "torch": torch.__version__, "numba": numba.__version__,
            "commit": commit or None}  # fmt: skip


def append_result(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
