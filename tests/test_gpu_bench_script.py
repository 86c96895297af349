"""benchmarks/gpu_bench.sh's Python part (issue 17, item 5) runs its every code path on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_script_runs_every_section_on_the_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--device", "cpu", "--tiny"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("device     cpu")
    for section in ("single_slide", "cohort", "streaming", "training"):
        assert any(line.startswith(f"section    {section} took") for line in lines)
    assert sum(line.startswith("agreement") for line in lines) == 3
    assert any("forward_slides" in line for line in lines)
    assert any("list of slides" in line for line in lines)
    assert (ROOT / "benchmarks" / "gpu_bench.sh").exists()
