"""Benchmark harness: ``python -m bench.run [--broker sqlite|redis|all] [--runs 3] [--celery]``.

Why it is shaped this way:

* Every measurement runs in a fresh *client* process (``--client SYSTEM:BROKER``, the
  same file), which starts and stops its own worker. celeriac and Celery are driven by
  the same client code with only the tasks module swapped (``bench.tasks`` /
  ``bench.celery_tasks``), Celery's under the Python of ``bench/.celery-venv``.
* W1 completion is seen through a counter file: each no-op task appends one byte with
  ``O_APPEND`` (atomic, ~2 µs), and the client polls its size. No stored results, no
  broker round trips, no ordering assumptions between the two pool processes.
* Worker CPU comes from ``/proc/<pid>/stat`` of the worker and its descendants between
  the first and the last completion; Redis commands and Redis CPU from ``INFO all``
  deltas (server-wide: other Redis users at the same time inflate them).

This module imports only the standard library at the top, so it runs in both venvs.
See bench/README.md for the method and the recorded numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
CELERY_VENV = ROOT / "bench" / ".celery-venv"
REDIS_DBS = {"celeriac": 10, "celery": 11}  # one server, one database per system
RESULT_PREFIX = "BENCH-RESULT "
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL = 0.005  # counter-file poll interval: <1% of a 5,000-task drain, ~1% of a core


@dataclass(frozen=True)
class Target:
    system: str  # "celeriac" | "celery"
    broker: str  # "sqlite" | "redis"

    @property
    def label(self) -> str:
        return f"{self.system}/{self.broker}"


# -- /proc and Redis probes -------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime+stime ticks, start time) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19])


def _descendants(root: int) -> dict[int, tuple[int, int]]:
    """Every live descendant of ``root``: pid -> (cpu ticks, start time)."""
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            table[int(entry)] = stat
    found: dict[int, tuple[int, int]] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, ticks, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (ticks, start)
                frontier.append(pid)
    return found


@dataclass(frozen=True)
class CpuSnapshot:
    main: int  # ticks of the worker's main process (all its threads)
    children: dict[int, tuple[int, int]]  # pid -> (ticks, start time)

    @classmethod
    def take(cls, pid: int) -> CpuSnapshot:
        stat = _proc_stat(pid)
        return cls(stat[1] if stat else 0, _descendants(pid))

    def seconds_since(self, before: CpuSnapshot) -> tuple[float, float]:
        """(main, children) CPU seconds; a child that was replaced counts from zero."""
        kids = 0
        for pid, (ticks, start) in self.children.items():
            old = before.children.get(pid)
            kids += ticks - (old[0] if old and old[1] == start else 0)
        return (self.main - before.main) / CLK_TCK, kids / CLK_TCK


@dataclass(frozen=True)
class RedisStats:
    calls: dict[str, int]  # command -> calls so far, server-wide
    cpu: float  # redis-server user+sys seconds so far

    def per_item(self, before: RedisStats, items: int) -> dict[str, Any]:
        """Commands, CPU and the busiest commands per item since ``before``.

        The ``INFO`` that took ``before`` is counted in ``self`` and is subtracted.
        """
        delta = {k: v - before.calls.get(k, 0) for k, v in self.calls.items()}
        delta["info"] = delta.get("info", 0) - 1
        top = sorted(((v, k) for k, v in delta.items() if v > 0), reverse=True)[:6]
        return {"cmds": sum(delta.values()) / items,
                "cpu_us": (self.cpu - before.cpu) / items * 1e6,
                "by_cmd": {k: round(v / items, 3) for v, k in top}}


class RedisProbe:
    """Server-wide command counts and CPU from one ``INFO all``."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)

    def snapshot(self) -> RedisStats:
        info = self.client.info("all")
        calls = {k[8:]: int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_")}
        return RedisStats(calls, float(info["used_cpu_sys"]) + float(info["used_cpu_user"]))


# -- the client: one system on one broker, all workloads ----------------------------------


def _counter_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _wait_count(path: Path, target: int, proc: subprocess.Popen[bytes], timeout: float,
                errlog: Path) -> int:
    deadline = time.monotonic() + timeout
    while True:
        size = _counter_size(path)
        if size >= target:
            return size
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}: {_tail(errlog)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {size} of {target} tasks ran in {timeout:.0f} s; "
                               f"worker log: {_tail(errlog)}")
        time.sleep(POLL)


def _tail(path: Path, lines: int = 6) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes], seen: dict[int, tuple[int, int]]) -> None:
    """SIGTERM the worker (warm shutdown), SIGKILL after 15 s, then any orphaned child
    we saw, by pid and only if its start time still matches (no pid-reuse accidents)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for pid, (_, start) in seen.items():
        stat = _proc_stat(pid)
        if stat is not None and stat[2] == start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def redis_url(system: str, port: int) -> str:
    return f"redis://127.0.0.1:{port}/{REDIS_DBS[system]}"


def run_client(target: Target, workdir: Path, n: int, latency_n: int, group_n: int,
               results: dict[str, Any], redis_port: int = 6379) -> None:
    """Run W2, W1, W3, W4 in that order, filling ``results`` as each finishes."""
    counter = workdir / "counter"
    os.environ["BENCH_COUNTER"] = str(counter)
    if target.system == "celeriac":
        url = (f"sqlite:///{workdir / 'broker.sqlite'}" if target.broker == "sqlite"
               else redis_url("celeriac", redis_port))
        os.environ["CELERIAC_BROKER_URL"] = os.environ["CELERIAC_RESULT_BACKEND"] = url
        module, cli = "bench.tasks", "celeriac"
    else:
        url = os.environ["BENCH_CELERY_URL"] = redis_url("celery", redis_port)
        module, cli = "bench.celery_tasks", "celery"
    probe = RedisProbe(url) if target.broker == "redis" else None
    if probe is not None:
        probe.client.flushdb()
    tasks = importlib.import_module(module)
    noop, add, tsum = tasks.noop, tasks.add, tasks.tsum

    # W2: sequential sync .delay() of the no-op (results ignored); these feed W1.
    noop.delay()  # connect and declare, not timed
    r0 = probe.snapshot() if probe else None
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        noop.delay()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    results.update(w2_rate=n / elapsed, w2_client_cpu_us=cpu / n * 1e6)
    if probe and r0:
        w2 = probe.snapshot().per_item(r0, n)
        results.update(w2_redis_cmds=w2["cmds"], w2_redis_by_cmd=w2["by_cmd"])

    # W1: start a worker on the full queue; time the drain through the counter file.
    expected = n + 1
    errlog = workdir / "worker.log"
    cmd = [sys.executable, "-m", cli, "-A", module, "worker", "-c", "2", "-P", "prefork",
           "-l", "warning"]
    seen: dict[int, tuple[int, int]] = {}
    with open(errlog, "wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        first = _wait_count(counter, 1, proc, 60, errlog)
        t_first = time.perf_counter()
        snap0 = CpuSnapshot.take(proc.pid)
        seen.update(snap0.children)
        r0 = probe.snapshot() if probe else None
        _wait_count(counter, expected, proc, 60 + n / 50, errlog)
        t_done = time.perf_counter()
        snap1 = CpuSnapshot.take(proc.pid)
        seen.update(snap1.children)
        r1 = probe.snapshot() if probe else None
        done = expected - first
        results.update(w1_wall_s=t_done - started, w1_counted=done)
        if done >= max(10, n // 10):  # too few after the first sighting to time
            main_s, kids_s = snap1.seconds_since(snap0)
            results.update(w1_rate=done / (t_done - t_first),
                           w1_main_cpu_us=main_s / done * 1e6,
                           w1_children_cpu_us=kids_s / done * 1e6)
            if probe and r0 and r1:
                w1 = r1.per_item(r0, done)
                results.update(w1_redis_cmds=w1["cmds"], w1_redis_cpu_us=w1["cpu_us"],
                               w1_redis_by_cmd=w1["by_cmd"])

        # W3: sequential round trips through a running worker.
        for _ in range(5):
            add.delay(1, 2).get(timeout=30)
        lat = []
        for _ in range(latency_n):
            t = time.perf_counter()
            if add.delay(1, 2).get(timeout=30) != 3:
                raise AssertionError("add(1, 2) != 3")
            lat.append(time.perf_counter() - t)
        results.update(w3_p50_ms=statistics.median(lat) * 1e3,
                       w3_p99_ms=_percentile(lat, 0.99) * 1e3)

        # W4: a group of add, then a chord of add into tsum.
        want = [2 * i for i in range(group_n)]
        t = time.perf_counter()
        got = tasks.group(add.s(i, i) for i in range(group_n))().get(timeout=120)
        results["w4_group_s"] = time.perf_counter() - t
        if list(got) != want:
            raise AssertionError("group results differ")
        t = time.perf_counter()
        total = tasks.chord(add.s(i, i) for i in range(group_n))(tsum.s()).get(timeout=120)
        results["w4_chord_s"] = time.perf_counter() - t
        if total != sum(want):
            raise AssertionError(f"chord gave {total}, expected {sum(want)}")
    finally:
        seen.update(_descendants(proc.pid))
        _stop(proc, seen)
        if probe is not None:
            probe.client.flushdb()
            probe.client.close()


def _client_main(args: argparse.Namespace) -> int:
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwind through finally: the worker gets stopped

    signal.signal(signal.SIGTERM, on_term)
    system, _, broker = args.client.partition(":")
    results: dict[str, Any] = {}
    code = 0
    try:
        run_client(Target(system, broker), Path(args.workdir), args.n, args.latency_n,
                   args.group_n, results, args.redis_port)
    except BaseException as exc:  # SIGTERM/^C too: still report what was measured
        results["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        code = 1
    sys.stdout.write(RESULT_PREFIX + json.dumps(results) + "\n")
    sys.stdout.flush()
    return code


# -- the orchestrator ------------------------------------------------------------------------


def _python_for(target: Target) -> str:
    return str(CELERY_VENV / "bin" / "python") if target.system == "celery" else sys.executable


def ensure_celery_venv() -> str:
    """Create bench/.celery-venv with ``celery[redis]==5.*`` once; return its versions."""
    python = CELERY_VENV / "bin" / "python"
    probe = [str(python), "-c",
             "import celery, kombu, redis; print(celery.__version__, kombu.__version__, "
             "redis.__version__)"]
    if not python.exists() or subprocess.run(probe, capture_output=True).returncode:
        logger.info("creating %s with celery[redis]==5.* ...", CELERY_VENV)
        subprocess.run([sys.executable, "-m", "venv", str(CELERY_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "celery[redis]==5.*"],
                       check=True)
    out = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()
    return f"celery {out[0]} (kombu {out[1]}, redis-py {out[2]})"


def redis_reachable(url: str) -> str | None:
    """None if Redis answers PING, else why not."""
    try:
        import redis
    except ImportError as exc:
        return f"redis-py missing: {exc}"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        return f"Redis not reachable at {url}: {exc}"
    finally:
        client.close()
    return None


def machine_description(celery_versions: str | None) -> str:
    import sqlite3

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "unknown RAM"
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        kib = int(fh.readline().split()[1])
        ram = f"{kib / 1024 / 1024:.1f} GiB RAM"
    redis_ver = "redis-server not found"
    if exe := shutil.which("redis-server"):
        text = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        redis_ver = "redis-server " + next(
            (w[2:] for w in text.split() if w.startswith("v=")), text.strip())
    parts = [cpu, f"{os.cpu_count()} cores", ram,
             f"{platform.system()} {platform.release()}",
             f"Python {platform.python_version()}", f"SQLite {sqlite3.sqlite_version}",
             redis_ver]
    if celery_versions:
        parts.append(celery_versions)
    return ", ".join(parts)


@contextlib.contextmanager
def private_redis() -> Iterator[int]:
    """A redis-server of our own on a free port (no persistence, like the shared one)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("--private-redis: redis-server is not installed")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--databases", "16"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while redis_reachable(f"redis://127.0.0.1:{port}/0") is not None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"--private-redis: redis-server on port {port} did not start")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().split()[0]
    except OSError:
        return "?"


def run_target(target: Target, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [_python_for(target), "-m", "bench.run", "--client", f"{target.system}:{target.broker}",
           "--workdir", str(workdir), "--n", str(args.n), "--latency-n", str(args.latency_n),
           "--group-n", str(args.group_n), "--redis-port", str(args.redis_port)]
    timeout = 180 + args.n / 25 + args.latency_n / 5 + args.group_n / 5
    with open(workdir / "client.log", "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the client stops its worker on SIGTERM
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            return {"error": f"client timed out after {timeout:.0f} s"}
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            if "error" in result:
                result["error"] += f" (log: {_tail(workdir / 'client.log', 3)})"
            return result
    return {"error": f"client exited {proc.returncode}: {_tail(workdir / 'client.log')}"}


# (key, label, higher is better, format)
METRICS: list[tuple[str, str, bool, str]] = [
    ("w1_rate", "W1 drain, steady (tasks/s)", True, "{:,.0f}"),
    ("w1_wall_s", "W1 wall from worker start (s)", False, "{:.2f}"),
    ("w1_main_cpu_us", "W1 worker main-process CPU (µs/task)", False, "{:.0f}"),
    ("w1_children_cpu_us", "W1 pool children CPU (µs/task)", False, "{:.0f}"),
    ("w1_redis_cmds", "W1 Redis commands/task", False, "{:.2f}"),
    ("w1_redis_cpu_us", "W1 redis-server CPU (µs/task)", False, "{:.0f}"),
    ("w2_rate", "W2 enqueue, sync .delay() (calls/s)", True, "{:,.0f}"),
    ("w2_client_cpu_us", "W2 client CPU (µs/call)", False, "{:.0f}"),
    ("w2_redis_cmds", "W2 Redis commands/call", False, "{:.2f}"),
    ("w3_p50_ms", "W3 round trip p50 (ms)", False, "{:.2f}"),
    ("w3_p99_ms", "W3 round trip p99 (ms)", False, "{:.2f}"),
    ("w4_group_s", "W4 group of {g} (s)", False, "{:.3f}"),
    ("w4_chord_s", "W4 chord of {g} (s)", False, "{:.3f}"),
]


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = {k for run in runs for k, v in run.items() if isinstance(v, int | float)}
    return {k: statistics.median(r[k] for r in runs if k in r) for k in keys}


def report(targets: Sequence[Target], results: dict[str, list[dict[str, Any]]],
           args: argparse.Namespace) -> str:
    """A Markdown table of medians, with Celery ratios when Celery ran."""
    med = {t.label: medians(results[t.label]) for t in targets}
    celery = next((t.label for t in targets if t.system == "celery"), None)
    ours = [t.label for t in targets if t.system == "celeriac"]
    head = ["metric", *[t.label for t in targets]]
    if celery:
        head += [f"{label} vs {celery}" for label in ours if label.endswith("/redis")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, higher, fmt in METRICS:
        row = [label.format(g=args.group_n)]
        for t in targets:
            value = med[t.label].get(key)
            row.append(fmt.format(value) if value is not None else "-")
        if celery:
            for label_ in ours:
                if not label_.endswith("/redis"):
                    continue
                a, b = med[label_].get(key), med[celery].get(key)
                ratio = None if not a or not b else (a / b if higher else b / a)
                row.append(f"{ratio:.2f}x" if ratio is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    by_cmd = []
    for t in targets:
        for what, key in (("W1 per task", "w1_redis"), ("W2 per call", "w2_redis")):
            runs = [r for r in results[t.label] if f"{key}_by_cmd" in r]
            if runs:  # other Redis users only add commands: the quietest run is the truest
                best = min(runs, key=lambda r: float(r[f"{key}_cmds"]))
                by_cmd.append(f"- {t.label} {what}: " + ", ".join(
                    f"{k} {v:g}" for k, v in best[f"{key}_by_cmd"].items()))
    if by_cmd:
        lines += ["", "Busiest Redis commands (run with the fewest; commands run inside Lua "
                  "scripts count too):", *by_cmd]
    if celery:
        lines.append("")
        lines.append("Ratios: >1x means celeriac is better (faster, or less CPU/commands).")
    errors = [f"- {label} run {i + 1}: {r['error']}" for label, runs in results.items()
              for i, r in enumerate(runs) if "error" in r]
    if errors:
        lines += ["", "Failures:", *errors]
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--broker", choices=["sqlite", "redis", "all"], default="sqlite")
    parser.add_argument("--runs", type=int, default=3, help="runs of every workload (≥ 3 for "
                        "the record); systems alternate order between runs")
    parser.add_argument("--n", type=int, default=5000, help="tasks for W1 and W2")
    parser.add_argument("--latency-n", type=int, default=300, help="round trips for W3")
    parser.add_argument("--group-n", type=int, default=1000, help="group/chord size for W4")
    parser.add_argument("--celery", action="store_true",
                        help="also run real Celery 5 on Redis (creates bench/.celery-venv)")
    parser.add_argument("--workdir", help="keep broker files and logs here (default: a "
                        "temporary directory, removed afterwards)")
    parser.add_argument("--json", help="also write every run's raw numbers to this file")
    parser.add_argument("--private-redis", action="store_true",
                        help="start a redis-server of our own on a free 127.0.0.1 port, so "
                        "nobody else's commands or CPU are counted")
    parser.add_argument("--redis-port", type=int, default=6379, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    tmp = tempfile.mkdtemp(prefix="celeriac-bench-")
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None, out: Callable[[str], object] = sys.stdout.write
         ) -> int:
    args = _parse(argv)
    if args.client:
        return _client_main(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    brokers = ["sqlite", "redis"] if args.broker == "all" else [args.broker]
    targets = [Target("celeriac", b) for b in brokers]
    if args.celery:
        targets.append(Target("celery", "redis"))
    versions = ensure_celery_venv() if args.celery else None
    if args.private_redis and any(t.broker == "redis" for t in targets):
        with private_redis() as args.redis_port:
            return _orchestrate(args, targets, versions, out)
    return _orchestrate(args, targets, versions, out)


def _orchestrate(args: argparse.Namespace, targets: list[Target], versions: str | None,
                 out: Callable[[str], object]) -> int:
    results: dict[str, list[dict[str, Any]]] = {t.label: [] for t in targets}
    port = args.redis_port
    broken: dict[str, str] = {}
    for t in targets:
        if t.broker == "redis" and (why := redis_reachable(redis_url(t.system, port))):
            broken[t.label] = why
    started, load_before = dt.datetime.now(dt.UTC), _loadavg()
    with _workdir(args.workdir) as workdir:
        for run in range(args.runs):
            order = targets if run % 2 == 0 else targets[::-1]
            for t in order:
                if t.label in broken:
                    results[t.label].append({"error": broken[t.label]})
                    continue
                logger.info("run %d/%d: %s ...", run + 1, args.runs, t.label)
                result = run_target(t, workdir / f"{t.system}-{t.broker}-{run + 1}", args)
                results[t.label].append(result)
                if "error" in result:
                    logger.warning("  %s failed: %s", t.label, result["error"])
                    if sum("error" in r for r in results[t.label]) >= 2:  # not a fluke
                        broken[t.label] = f"skipped after failures up to run {run + 1}"
                else:
                    logger.info("  %s", ", ".join(f"{k}={v:.4g}" for k, v in result.items()
                                                    if isinstance(v, float)))
    text = "\n".join([
        f"celeriac benchmark, {started:%Y-%m-%d %H:%M} UTC: medians of {args.runs} run(s); "
        f"W1/W2 n={args.n}, W3 {args.latency_n} round trips, W4 size {args.group_n}; "
        "worker -c 2 -P prefork; W1/W2 tasks ignore results.",
        f"Machine: {machine_description(versions)}",
        f"Redis: 127.0.0.1:{port}" + (" (private server started for this run)"
                                      if args.private_redis else " (shared server)"),
        f"Load average (1 min) before/after: {load_before}/{_loadavg()} (other work on the "
        "machine skews the numbers; compare ratios from one invocation)",
        "",
        report(targets, results, args),
        "",
    ])
    out(text)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"started": started.isoformat(), "args": vars(args), "results": results}, indent=1))
    ok = all(not any("error" in r for r in runs) for runs in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
