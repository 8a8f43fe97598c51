"""bench/memory_budget.py end to end on a tiny checkpoint: every file it promises, the same tokens at every budget."""

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_budget_sweep_writes_csv_json_and_plot_with_identical_tokens(tiny, tmp_path):
    r = subprocess.run([sys.executable, "bench/memory_budget.py", "--checkpoint", str(tiny), "--budgets", "100,50,25",
                        "--tokens", "6", "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    summary = json.loads((tmp_path / "memory_budget.json").read_text())
    assert summary["tokens_identical"] and summary["disk_read_gbs"] > 0
    points = summary["points"]
    assert [(p["ram_fraction"], p["prefetch"]) for p in points] == [(1.0, True), (0.5, True), (0.5, False),
                                                                   (0.25, True), (0.25, False)]  # fmt: skip
    assert [p["slots"] for p in points] == [16, 8, 8, 4, 4]
    assert points[0]["disk_mb_per_token"] == 0 and all(p["disk_mb_per_token"] > 0 for p in points[1:])
    rows = list(csv.DictReader(open(tmp_path / "memory_budget.csv")))
    assert len(rows) == 5 and float(rows[3]["hit_rate"]) <= 1
    png = (tmp_path / "memory_budget.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
