"""The measuring half of airvae's benchmarks: analytic FLOP counts, load-aware interleaved timing,
the machine's fp32 matmul ceiling and description, and the Markdown report. No airvae code is timed
here: benchmarks/bench.py holds the cases, benchmarks/reference.py the plain baseline."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import time

import torch

import airvae
from airvae.networks import parse_hidden_spec

X_DIM, Z_DIM = 784, 64  # Table 6's x784 and z64: every benchmarked model's data and latent sizes

# ----------------------------------------------------------------------------------------------
# FLOPs


def layer_dims(in_dim: int, hidden: str, heads: list[int]) -> list[tuple[int, int]]:
    dims, width = [], in_dim
    for units in parse_hidden_spec(hidden):
        dims.append((width, units))
        width = units
    return dims + [(width, h) for h in heads]


def forward_flops(dims: list[tuple[int, int]]) -> int:
    return sum(2 * i * o for i, o in dims)


def arch_flops(enc: str, dec: str) -> tuple[int, int]:
    """Forward matmul FLOPs per example of the encoder (mean + variance heads) and per latent sample
    of the decoder."""
    return (forward_flops(layer_dims(X_DIM, enc, [Z_DIM, Z_DIM])),
            forward_flops(layer_dims(Z_DIM, dec, [X_DIM])))


# ----------------------------------------------------------------------------------------------
# Measurement helpers


def _busy_seconds() -> float | None:
    """Machine-wide busy CPU seconds so far (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields]
    busy = values[0] + values[1] + values[2] + sum(values[5:8])  # user nice system irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


class OutsideLoad:
    """Cores used by other processes during a block: machine busy time minus this process's."""

    def __enter__(self):
        self.b0, self.p0, self.t0 = _busy_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        b1, p1, t1 = _busy_seconds(), time.process_time(), time.perf_counter()
        if self.b0 is None or b1 is None:
            self.cores = None
        else:
            self.cores = max(0.0, ((b1 - self.b0) - (p1 - self.p0)) / max(t1 - self.t0, 1e-9))


def _minor_faults() -> int | None:
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CONTENDED_CORES = 0.1  # outside load above this (in cores) marks a round as disturbed


class Timer:
    """Interleaved, load-aware timing of named workloads."""

    def __init__(self, device: torch.device, retry_budget_s: float):
        self.device, self.retry_budget_s = device, retry_budget_s
        self.retry_spent = self.waited = 0.0

    def wait_idle(self, window: float = 0.25) -> None:
        """Waits (within the budget) until other processes leave the CPU alone."""
        while self.waited + self.retry_spent < self.retry_budget_s:
            with OutsideLoad() as load:
                time.sleep(window)
            if load.cores is None or load.cores <= CONTENDED_CORES:
                return
            self.waited += window

    def rate(self, fn, min_time: float, min_calls: int = 1, units_per_call: float = 1.0):
        """Calls of ``fn`` per second (times units_per_call) over at least ``min_time`` s, with the
        outside load seen meanwhile (cores) and minor page faults per unit (None when not
        measurable). A ``fn`` marked ``self_timed`` returns its own rate."""
        sync(self.device)
        faults0 = _minor_faults()
        with OutsideLoad() as load:
            if getattr(fn, "self_timed", False):
                r, units = fn(), None
            else:
                t0 = time.perf_counter()
                n = 0
                while n < min_calls or time.perf_counter() - t0 < min_time:
                    fn()
                    n += 1
                sync(self.device)
                units = n * units_per_call
                r = units / (time.perf_counter() - t0)
        faults = _minor_faults()
        return r, load.cores, (faults - faults0) / units if units and faults is not None else None

    def compare(self, fns: dict, rounds: int, min_time: float, min_calls: int = 1, units_per_call=1.0):
        """Best rate of each workload over interleaved rounds; disturbed rounds are repeated while
        the retry budget lasts."""
        samples = {name: [] for name in fns}
        faults = {name: None for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                for attempt in range(4):
                    self.wait_idle()
                    t0 = time.perf_counter()
                    r, cores, faults[name] = self.rate(fn, min_time, min_calls, units_per_call)
                    samples[name].append((r, cores))
                    disturbed = cores is not None and cores > CONTENDED_CORES
                    if disturbed and self.retry_spent < self.retry_budget_s and attempt < 3:
                        self.retry_spent += time.perf_counter() - t0
                        time.sleep(0.5)
                        continue
                    break
        out = {}
        for name, s in samples.items():
            clean = [r for r, c in s if c is None or c <= CONTENDED_CORES]
            use = clean or [r for r, _ in s]
            out[name] = {"rate": max(use), "median": statistics.median(use), "rounds": len(s),
                         "clean_rounds": len(clean), "contended": not clean,
                         "page_faults_per_unit": faults[name],  # minor faults per step/example, last round
                         "max_outside_load_cores": max((c for _, c in s if c is not None), default=None)}
        return out


def matmul_ceiling(device: torch.device, n: int, reps: int) -> float:
    """Best fp32 n x n matmul rate (FLOP/s) over ``reps`` timed products."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
            "logical_cpus": os.cpu_count(), "torch": torch.__version__, "airvae": getattr(airvae, "__version__", None),
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": str(device),
            "mkl": torch.backends.mkl.is_available(), "loadavg_at_start": loadavg(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "AIRVAE_COMPILE") if k in os.environ}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Output


def pct(flops_per_s: float, ceiling: float) -> float:
    return 100.0 * flops_per_s / ceiling




# The measured variants a row may hold, and its speed-up ratios with their labels.
VARIANTS = ("airvae", "airvae+compile", "reference", "default malloc")
SPEEDUPS = (("speedup", "{:.2f}x"), ("speedup_compile", "compiled {:.2f}x"),
            ("speedup_vs_single", "{:.2f}x per model vs one at a time"),
            ("speedup_vs_default_malloc", "{:.2f}x vs default malloc"))


def _speedups(row) -> list[str]:
    return [label.format(row[key]) for key, label in SPEEDUPS if key in row]


def print_row(row):
    parts = [f"  {row['case']:<34}"]
    for name in VARIANTS:
        if name in row:
            m = row[name]
            pf = m.get("page_faults_per_unit")
            parts.append(f"{name} {m['rate']:.2f} ({m['pct_ceiling']:.1f}%" + (f", {pf:.0f} faults" if pf is not None else "")
                         + ")" + ("*" if m.get("contended") else ""))
    parts += _speedups(row)
    print("  ".join(parts) + f"  {row.get('unit', '')}", flush=True)


def markdown(report: dict) -> str:
    m, c = report["machine"], report["ceiling"]
    lines = [f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs, {m['cpu_capability']}), torch {m['torch']}, "
             f"{m['threads']} threads, device {m['device']}, malloc {m.get('malloc', 'default')}, {m['date']}",
             f"fp32 matmul ceiling: {c['gflops']:.1f} GFLOP/s (best {c['n']}^2 torch.mm; start {c['start_gflops']:.1f}, "
             f"end {c['end_gflops']:.1f}). % = achieved analytic matmul FLOP/s / ceiling. "
             "`*` = every round saw other processes using CPU.", "",
             "| workload | unit | airvae | % ceil | airvae+compile | % ceil | reference | % ceil | speed-up vs reference |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]

    def cell(row, name):
        v = row.get(name)
        if not v:
            return ["", ""]
        return [f"{v['rate']:.2f}" + ("*" if v.get("contended") else ""), f"{v['pct_ceiling']:.1f}"]

    for row in report["results"]:
        if "error" in row:
            lines.append(f"| {row['section']}: {row['case']} | error | {row['error'][:200]!r} | | | | | | |")
            continue
        speed = ["(reference column: same workload, default malloc)"] if "default malloc" in row else []
        speed += _speedups(row)
        ref = "default malloc" if "default malloc" in row else "reference"  # allocator rows: the baseline
        lines.append("| " + " | ".join([f"{row['section']}: {row['case']}", row["unit"], *cell(row, "airvae"),
                                        *cell(row, "airvae+compile"), *cell(row, ref), ", ".join(speed)]) + " |")
        for s in row.get("chunk_sweep", []):
            lines.append(f"| &nbsp;&nbsp;chunk_samples={s['chunk_samples']} | examples/s | {s['rate']:.2f} | "
                         f"{s['pct_ceiling']:.1f} | | | | | |")
        if row.get("note"):
            lines.append(f"| &nbsp;&nbsp;note: {row['note']} | | | | | | | | |")
    return "\n".join(lines)


