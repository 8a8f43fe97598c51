import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py

from hybrid.presets import synthetic_config  # noqa: E402
from hybrid.synthetic import write_checkpoint  # noqa: E402

torch.set_num_threads(max(1, torch.get_num_threads()))


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: the error measure every parity test states its tolerance in."""
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Write (once per session) a synthetic checkpoint for a preset plus config overrides."""
    made: dict[str, Path] = {}

    def make(name: str, preset: str = "tiny", shard_mb: float = 1.0, **overrides) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp(name)
            write_checkpoint(out, synthetic_config(preset, **overrides), shard_bytes=int(shard_mb * 1e6),
                             progress=False)  # fmt: skip
            made[name] = out
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny(checkpoint_factory) -> Path:
    return checkpoint_factory("tiny")
