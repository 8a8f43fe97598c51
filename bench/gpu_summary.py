"""One JSON summary of a `bash bench/gpu_box.sh all` run: test counts and failures, the kernel bench, the decode
bench. Reads what the run wrote into its output folder.

    python bench/gpu_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def tests(out: Path) -> dict:
    path = out / "gpu_tests.xml"
    if not path.exists():
        return {"ran": False}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]  # fmt: skip
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"ran": True, **counts, "seconds": float(suite.get("time", 0)), "failed": failed}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(out: Path) -> dict:
    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None
    fields = ("kernel", "linear", "tokens", "context", "max_rel_err", "kernel_gbs", "copy_gbs", "torch_dequant_gbs",
              "ms", "reference_ms")
    kernels = [{k: r[k] for k in fields if r.get(k) is not None} for r in records(out / "gpu_kernels.jsonl")]
    decode = records(out / "decode.jsonl")
    last = decode[-1] if decode else {}
    keep = ("cpu", "gpu", "decode_tokens_per_s", "step_ms", "stream_gbs", "routed_gbs_effective", "moe_layer_ms",
            "phases_ms_per_token", "projection_61_layers", "prefill", "peak_rss_gib", "peak_vram_gib", "commit")
    return {"gpu": gpu, "tests": tests(out), "kernels": kernels, "decode": {k: last[k] for k in keep if k in last}}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")), indent=1))
