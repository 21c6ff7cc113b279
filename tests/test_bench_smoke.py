"""The benchmark harness runs end to end on sqlite with tiny counts (no numbers checked).

It proves ``python -m bench.run`` still drives a real worker through every workload, so
the harness does not rot between the times someone records numbers with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_every_workload_on_sqlite(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--broker", "sqlite", "--runs", "1",
         "--n", "50", "--latency-n", "10", "--group-n", "20",
         "--workdir", str(tmp_path / "work"), "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Machine:" in proc.stdout and "SQLite" in proc.stdout
    assert "| W3 round trip p50 (ms) |" in proc.stdout
    [run] = json.loads(out_json.read_text())["results"]["celeriac/sqlite"]
    assert "error" not in run
    for key in ("w2_rate", "w1_wall_s", "w3_p50_ms", "w3_p99_ms", "w4_group_s", "w4_chord_s"):
        assert run[key] > 0, key
    assert run["w3_p99_ms"] >= run["w3_p50_ms"]


def test_bench_worker_is_gone_after_the_run(tmp_path: Path) -> None:
    """The client stops its worker (and the worker's children) before it returns."""
    work = tmp_path / "work"
    subprocess.run(
        [sys.executable, "-m", "bench.run", "--runs", "1", "--n", "20", "--latency-n", "2",
         "--group-n", "2", "--workdir", str(work)],
        cwd=ROOT, capture_output=True, timeout=90, check=True,
    )
    needle = str(work).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            assert needle not in environ, f"process {entry.name} from the bench still runs"
