#!/usr/bin/env python
"""airvae speed benchmark: training steps/s, IWAE-5000 and IW-SVI throughput, as FLOP/s next to the
machine's fp32 matmul ceiling measured in the same run, each beside a plain eager reference.

    python benchmarks/bench.py [--quick] [--out benchmarks/results.json] [--device auto|cpu|cuda]

Prints a Markdown table and writes JSON. See benchmarks/README.md for what the numbers mean.

FLOP counting (analytic, matmuls only): a dense layer costs 2*in*out FLOPs per row forward; a
training step costs 3x forward (backward = grad-input + grad-weight matmuls); the encoder runs
once per example, the decoder k*m times. Evaluation (IWAE-k) is forward only; an IW-SVI step is
2x the decoder forward of its l samples (forward + the grad-input backward to z; the frozen
decoder needs no weight gradients).

Timing: every workload runs in interleaved rounds (airvae, reference, airvae, ...), and each rate
is the best round. The CPU time that *other* processes used during each round is read from
/proc/stat: on a shared 2-core machine another busy process halves OpenMP throughput, so rounds
with outside load are retried (up to a budget) and flagged in the JSON ("contended").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # runnable without PYTHONPATH=src
    sys.path.insert(0, str(ROOT / "src"))

import torch
from harness import (
    VARIANTS,
    X_DIM,
    Z_DIM,
    Timer,
    arch_flops,
    loadavg,
    machine_info,
    markdown,
    matmul_ceiling,
    pct,
    print_row,
    sync,
)
from reference import RefVAE, ref_iw_svi_steps, ref_iwae, ref_train_step

from airvae.compiling import set_compile

# the training driver's own pieces, so the benchmark measures exactly the step every airvae run takes
from airvae.driver import MinibatchSchedule, SingleEngine, training_generator
from airvae.estimators import fit_iw_svi, iwae_log_likelihood
from airvae.model import build_vae, model_from_config

LOG_2PI = math.log(2 * math.pi)

# Table 6 architectures (encoder / decoder hidden layers, z64, x784) and batch sizes.
TRAIN_CASES = [
    {"name": "mnist k=1", "enc": "d300-d300", "dec": "d300-d300", "batch": 100, "k": 1, "lr": 1e-3, "T": 1_500_000, "n_train": 50_000},
    {"name": "mnist k=8", "enc": "d300-d300", "dec": "d300-d300", "batch": 100, "k": 8, "lr": 1e-3, "T": 1_500_000, "n_train": 50_000},
    {"name": "mnist k=64", "enc": "d300-d300", "dec": "d300-d300", "batch": 100, "k": 64, "lr": 1e-3, "T": 1_500_000, "n_train": 50_000},
    {"name": "caltech k=1", "enc": "d500", "dec": "d500", "batch": 10, "k": 1, "lr": 1e-4, "T": 400_000, "n_train": 4_100},
]
# Regularized variants of the MNIST k=1 step (full run only): their extra cost over the plain step.
VARIANT_CASES = [
    {"name": "mnist k=1 DVAE a=1", "sigma": 5.0 / 28, "alpha": 1.0},
    {"name": "mnist k=1 DVAE a=0.5", "sigma": 5.0 / 28, "alpha": 0.5},
    {"name": "mnist k=1 WNI H=4", "max_norm": 4.0},
]
FLOP_NOTE = ("matmul FLOPs only: a dense layer is 2*in*out per row forward; training step = 3x forward "
             "(encoder once per example, decoder k*m times per example); IWAE-k = forward only (encoder + k "
             "decoder passes per example); IW-SVI step = 2x the decoder forward of l samples per example "
             "(forward + grad-input backward; the frozen decoder needs no weight gradients)")


# ----------------------------------------------------------------------------------------------
# Workloads


def make_data(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Synthetic binary images resident on the device (MNIST's mean pixel ~0.13): the values do
    not change the cost of any operation measured here."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, X_DIM, generator=g) < 0.13).float().to(device)


def run_config(case: dict, device: torch.device, seed: int = 0, sigma: float | None = None):
    """The RunConfig of a case: Table 6's architecture and schedule, its regularizer, on ``device``."""
    from airvae.config import Architecture, Regularizer, RunConfig

    regularizer = Regularizer(sigma=case.get("sigma", 0.0) if sigma is None else sigma, alpha=case.get("alpha", 1.0),
                              max_norm=case.get("max_norm", math.inf))
    return RunConfig(dataset="bench", architecture=Architecture(case["enc"], case["dec"], Z_DIM), x_dim=X_DIM,
                     k=case["k"], seed=seed, lr=case["lr"], iterations=case["T"], batch_size=case["batch"],
                     regularizer=regularizer, device=str(device))


def airvae_train_step(case: dict, device: torch.device, data: torch.Tensor):
    """The step every airvae run takes (airvae.driver): the learning rate of eq. 43 for step t
    (RunConfig.lr_at), the minibatch of step t by index from resident data, and SingleEngine.step
    (the objective, backward, fused Adam), whose loss stays on the device as the driver keeps it."""
    cfg = run_config(case, device)
    torch.manual_seed(cfg.seed)
    engine = SingleEngine(model_from_config(cfg).to(device), lr=cfg.lr, k=cfg.k, m=cfg.m, alpha=cfg.regularizer.alpha,
                          generator=training_generator(cfg.seed, device), device=device)
    schedule = MinibatchSchedule(data.shape[0], cfg.batch_size, seed=cfg.seed, device=device)
    state = {"step": 0}

    def step():
        t = state["step"]
        engine.step(data[schedule.indices(t)].unsqueeze(0), [True], cfg.lr_at(t))
        state["step"] = t + 1

    return step


def stacked_configs(case: dict, models: int, device: torch.device, sigmas: list[float] | None = None) -> list:
    """The RunConfigs of ``models`` runs of ``case`` (seeds 0..models-1), for airvae.stacked."""
    return [run_config(case, device, seed=i, sigma=sigmas[i] if sigmas else 0.0) for i in range(models)]


# ----------------------------------------------------------------------------------------------
# Sections


def in_mode(fn, compiled: bool):
    """``fn`` run with airvae's compiled log-weights kernel on or off (a global switch)."""
    def run():
        set_compile(compiled)
        return fn()

    run.self_timed = getattr(fn, "self_timed", False)
    return run


def with_variants(args, make_airvae, make_reference=None) -> dict:
    """The workloads of one row: airvae as shipped (eager), airvae with the compiled kernel (when
    asked for), the plain reference."""
    fns = {"airvae": in_mode(make_airvae(), False)}
    if args.compile:
        fns["airvae+compile"] = in_mode(make_airvae(), True)
    if make_reference is not None:
        fns["reference"] = make_reference()
    return fns


def warm_up(fns: dict, calls: int) -> dict:
    """Runs each workload ``calls`` times; returns the seconds of the first call (compilation)."""
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
        for _ in range(calls - 1):
            fn()
    set_compile(False)
    return first


def fill_row(row: dict, r: dict, flops: float, ceiling_ref, first: dict | None = None) -> dict:
    for name, m in r.items():
        row[name] = {**m, "gflops": m["rate"] * flops / 1e9, "pct_ceiling": pct(m["rate"] * flops, ceiling_ref())}
        if first and name.endswith("compile"):
            row[name]["first_call_s"] = first[name]
    if "reference" in r:
        row["speedup"] = r["airvae"]["rate"] / r["reference"]["rate"]
        if "airvae+compile" in r:
            row["speedup_compile"] = r["airvae+compile"]["rate"] / r["reference"]["rate"]
    return row


def _selected(args, name: str) -> bool:
    return not args.cases or name in [c.strip() for c in args.cases.split(",")]


def bench_training(args, timer, device, ceiling_ref, results):
    cases = list(TRAIN_CASES)
    if not args.quick:
        base = TRAIN_CASES[0]
        cases += [{**base, **v} for v in VARIANT_CASES]
    data_cache = {}
    for case in cases:
        if not _selected(args, case["name"]):
            continue
        if case["n_train"] not in data_cache:
            data_cache[case["n_train"]] = make_data(case["n_train"], device)
        data = data_cache[case["n_train"]]
        enc_f, dec_f = arch_flops(case["enc"], case["dec"])
        flops = 3 * case["batch"] * (enc_f + case["k"] * dec_f)
        if case.get("alpha", 1.0) not in (0.0, 1.0):
            flops *= 2  # eq. 16 evaluates both the noisy and the clean objective
        with_ref = "sigma" not in case and "max_norm" not in case and args.reference
        fns = with_variants(args, partial(airvae_train_step, case, device, data),
                            partial(ref_train_step, case, device, data) if with_ref else None)
        first = warm_up(fns, args.warmup_steps)
        expected = flops / max(ceiling_ref() * 0.3, 1e9)  # rough seconds per step
        min_calls = max(3, int(0.1 / max(expected, 1e-6)))
        r = timer.compare(fns, args.rounds, args.min_time, min_calls)
        row = {"section": "train", "case": case["name"], "batch": case["batch"], "k": case["k"],
               "flops_per_step": flops, "unit": "steps/s"}
        results.append(fill_row(row, r, flops, ceiling_ref, first))
        print_row(row)


def bench_stacked(args, timer, device, ceiling_ref, results):
    for case in (TRAIN_CASES[0], TRAIN_CASES[3]):  # MNIST (batch 100) and Caltech (batch 10)
        if _selected(args, case["name"]) and not (args.quick and case is TRAIN_CASES[3]):
            _bench_stacked_case(args, timer, device, ceiling_ref, results, case)


def _bench_stacked_case(args, timer, device, ceiling_ref, results, case):
    """airvae.stacked's training step for groups of m runs against one run trained alone, as
    run-steps/s (what a sweep gets done per second)."""
    from airvae.stacked import training_steps

    data = make_data(case["n_train"], device)
    enc_f, dec_f = arch_flops(case["enc"], case["dec"])
    flops = 3 * case["batch"] * (enc_f + case["k"] * dec_f)
    fns = {}
    for m in [4] if args.quick else [2, 4, 8]:
        group_step, single_step = training_steps(stacked_configs(case, m, device), data, device)
        fns.setdefault("single", in_mode(single_step, False))
        fns[f"stacked x{m}"] = in_mode(group_step, False)
    if not args.quick:
        fns["stacked x4 sigma-grid"] = in_mode(training_steps(
            stacked_configs(case, 4, device, sigmas=[0.0, 0.1, 0.2, 0.3]), data, device)[0], False)
    warm_up(fns, args.warmup_steps)
    r = timer.compare(fns, args.rounds, args.min_time, 3)
    single = r["single"]["rate"]
    for name, meas in r.items():
        m = 1 if name == "single" else int(name.split("x")[1].split()[0])
        per_model = meas["rate"] * m
        row = {"section": "stacked", "case": f"{case['name']} {name}", "models": m, "unit": "model-steps/s",
               "flops_per_step": flops * m,
               "airvae": {**meas, "rate": per_model, "gflops": per_model * flops / 1e9,
                          "pct_ceiling": pct(per_model * flops, ceiling_ref())},
               "speedup_vs_single": per_model / single}
        results.append(row)
        print_row(row)


def bench_iwae(args, timer, device, ceiling_ref, results):
    k = args.iwae_k
    for arch in ("mnist", "caltech"):
        case = TRAIN_CASES[0] if arch == "mnist" else TRAIN_CASES[3]
        if (args.quick and arch == "caltech") or not _selected(args, f"{arch} IWAE-{k}"):
            continue
        enc_f, dec_f = arch_flops(case["enc"], case["dec"])
        flops = enc_f + k * dec_f  # per example, forward only
        torch.manual_seed(0)
        model = build_vae(X_DIM, Z_DIM, case["enc"], case["dec"]).to(device).eval()
        ref = RefVAE(case["enc"], case["dec"]).to(device).eval()
        n = args.iwae_examples
        x = make_data(n, device, seed=1)
        # with_variants calls each maker for the function it times: here the estimator with its arguments bound
        fns = with_variants(args, partial(partial, iwae_log_likelihood, model, x, k, seed=0),
                            partial(partial, ref_iwae, ref, x, k) if args.reference else None)
        sweep = {}
        if args.chunk_sweep and arch == "mnist":
            for cs in args.chunk_sweep:
                sweep[f"chunk={cs}"] = in_mode(partial(iwae_log_likelihood, model, x, k, seed=0, chunk_samples=cs),
                                               False)
        first = warm_up(fns, 1)
        warm_up(sweep, 1)
        r = timer.compare(fns, args.rounds, args.min_time, 1, units_per_call=n)
        row = {"section": "iwae", "case": f"{arch} IWAE-{k}", "k": k, "examples": n, "unit": "examples/s",
               "flops_per_example": flops}
        fill_row(row, r, flops, ceiling_ref, first)
        if sweep:
            rs = timer.compare(sweep, max(2, args.rounds - 1), args.min_time, 1, units_per_call=n)
            row["chunk_sweep"] = [{"chunk_samples": int(name.split("=")[1]), **m, "gflops": m["rate"] * flops / 1e9,
                                   "pct_ceiling": pct(m["rate"] * flops, ceiling_ref())} for name, m in rs.items()]
        results.append(row)
        print_row(row)


def bench_iw_svi(args, timer, device, ceiling_ref, results):
    case, l = TRAIN_CASES[0], args.svi_l  # noqa: E741
    n = args.svi_examples
    enc_f, dec_f = arch_flops(case["enc"], case["dec"])
    flops = 2 * l * n * dec_f  # per step over n examples: forward + grad-input backward
    torch.manual_seed(0)
    model = build_vae(X_DIM, Z_DIM, case["enc"], case["dec"]).to(device).eval()
    ref = RefVAE(case["enc"], case["dec"]).to(device).eval()
    x = make_data(n, device, seed=2)
    row = {"section": "iw-svi", "case": f"mnist IW-SVI l={l}", "l": l, "examples": n, "unit": "steps/s",
           "flops_per_step": flops}
    s1, s2 = args.svi_steps

    def make_airvae():
        def run(steps):
            fit_iw_svi(model, x, l=l, steps=steps, seed=0, chunk_examples=n)

        def rate():
            # steps/s from the difference of two fits, so setup and scoring cancel
            t0 = time.perf_counter()
            run(s1)
            sync(device)
            t1 = time.perf_counter()
            run(s2)
            sync(device)
            t2 = time.perf_counter()
            return (s2 - s1) / max((t2 - t1) - (t1 - t0), 1e-9)

        rate.self_timed = True
        return rate

    fns = with_variants(args, make_airvae, (lambda: ref_iw_svi_steps(ref, x, l)) if args.reference else None)
    first = warm_up(fns, 1)
    r = timer.compare(fns, args.svi_rounds, args.min_time, 3)
    fill_row(row, r, flops, ceiling_ref, first)
    results.append(row)
    print_row(row)


def bench_allocator(args, results, ceiling_ref):
    """airvae's eager numbers in child processes with glibc's default malloc and with ``--malloc
    tuned`` (freed memory is kept instead of returned to the kernel), alternating default, tuned,
    default, tuned; best of each. The difference is the page-fault cost of PyTorch's large
    temporaries, which depends on the process's allocation history, hence fresh processes."""
    import subprocess
    import tempfile

    cases = "mnist k=1,mnist k=64,mnist IWAE-5000"
    best: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(2):
            for mode in ("default", args.malloc_compare):
                out = Path(tmp) / f"child-{mode}-{rep}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--quick", "--sections", "train,iwae",
                       "--cases", cases, "--malloc", mode, "--no-compile", "--no-reference", "--out", str(out),
                       "--device", args.device, "--child"]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                print(f"allocator: child process {rep + 1}/2 with --malloc {mode}", flush=True)
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0 or not out.exists():
                    results.append({"section": "allocator", "case": f"child --malloc {mode}", "error": proc.stderr[-2000:]})
                    return
                for row in json.loads(out.read_text())["results"]:
                    key = (row["case"], mode)
                    if key not in best or row["airvae"]["rate"] > best[key]["airvae"]["rate"]:
                        best[key] = row
    for case in cases.split(","):
        base, tuned = best.get((case, "default")), best.get((case, args.malloc_compare))
        if base is None or tuned is None:
            continue
        flops = tuned.get("flops_per_step", tuned.get("flops_per_example"))
        row = {"section": "allocator", "case": f"{case} malloc={args.malloc_compare}", "unit": tuned["unit"]}
        for name, src in (("airvae", tuned), ("default malloc", base)):
            rate = src["airvae"]["rate"]
            row[name] = {**src["airvae"], "gflops": rate * flops / 1e9, "pct_ceiling": pct(rate * flops, ceiling_ref())}
        row["speedup_vs_default_malloc"] = tuned["airvae"]["rate"] / base["airvae"]["rate"]
        results.append(row)
        print_row(row)


# ----------------------------------------------------------------------------------------------
# Process-wide allocator settings (--malloc)


def configure_malloc(mode: str) -> None:
    """``tuned``: glibc malloc keeps freed memory instead of returning it to the kernel, so large
    tensors stop page-faulting on every allocation; ``thp``: PyTorch's 2 MB-aligned allocations with
    transparent huge pages (512x fewer faults). Both are process-wide and Linux-specific."""
    if mode == "default":
        return
    if mode == "thp":
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # read by c10 at its first >= 2 MB allocation
        return
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) \
        and libc.mallopt(M_TOP_PAD, 64 << 20)
    if not ok:
        raise RuntimeError("mallopt failed (not glibc?)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and cases, no compilation (under ~2 minutes)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"), help="JSON output path")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--sections", default="train,stacked,iwae,iw-svi,allocator", help="comma-separated subset")
    p.add_argument("--cases", default="", help="only workloads whose name contains one of these (comma-separated)")
    p.add_argument("--malloc", default="default", choices=["default", "tuned", "thp"],
                   help="process allocator setting for this run (see configure_malloc)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also measure airvae with its torch.compile'd kernel (default: on unless --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-reference", dest="reference", action="store_false", default=True)
    p.add_argument("--no-chunk-sweep", dest="chunk_sweep_on", action="store_false", default=True)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    configure_malloc(args.malloc)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    quick = args.quick
    if args.compile is None:
        args.compile = not quick  # compilation costs seconds per graph: never in a quick run
    args.rounds = 2 if quick else 4
    args.min_time = 0.6 if quick else 1.5
    args.warmup_steps = 5 if quick else 20
    args.iwae_k = 5000
    args.iwae_examples = 4 if quick else 10
    args.chunk_sweep = [1024, 2500, 5000, 10000, 20000] if (args.chunk_sweep_on and not quick) else []
    args.svi_l = 8
    args.svi_examples = 100 if quick else 500
    args.svi_steps = (64, 128)  # multiples of the estimator's 64-step noise blocks
    args.svi_rounds = 2
    args.malloc_compare = "tuned"
    if device.type == "cuda":
        args.iwae_examples *= 10
    timer = Timer(device, retry_budget_s=10 if quick else 150)
    sections = set(args.sections.split(","))
    if quick or args.child or device.type != "cpu" or not sys.platform.startswith("linux"):
        sections.discard("allocator")  # glibc/Linux only; a child process of about a minute

    started = time.perf_counter()
    info = machine_info(device)
    info["malloc"] = args.malloc
    ceiling_n = 2048 if device.type == "cpu" else 8192
    timer.wait_idle()
    start_ceiling = matmul_ceiling(device, ceiling_n, 10 if quick else 20)
    ceilings = [start_ceiling]
    print(f"{info['cpu']} | torch {info['torch']} | {info['threads']} threads | {device} | malloc {args.malloc}")
    print(f"fp32 matmul ceiling ({ceiling_n}^2): {start_ceiling / 1e9:.1f} GFLOP/s")

    def ceiling_ref():
        return max(ceilings)

    results: list[dict] = []
    if "train" in sections:
        print("training steps")
        bench_training(args, timer, device, ceiling_ref, results)
    if "stacked" in sections:
        print("stacked training (airvae.stacked)")
        bench_stacked(args, timer, device, ceiling_ref, results)
    if "iwae" in sections:
        print("IWAE evaluation")
        bench_iwae(args, timer, device, ceiling_ref, results)
    if "iw-svi" in sections:
        print("IW-SVI")
        bench_iw_svi(args, timer, device, ceiling_ref, results)
    timer.wait_idle()
    end_ceiling = matmul_ceiling(device, ceiling_n, 10 if quick else 20)
    ceilings.append(end_ceiling)
    if "allocator" in sections:
        bench_allocator(args, results, ceiling_ref)
    # Percentages are against the best ceiling of the run: recompute with the final one.
    for row in results:
        for key in VARIANTS:
            if isinstance(row.get(key), dict) and "gflops" in row[key]:
                row[key]["pct_ceiling"] = 100.0 * row[key]["gflops"] * 1e9 / ceiling_ref()
        for c in row.get("chunk_sweep", []):
            c["pct_ceiling"] = 100.0 * c["gflops"] * 1e9 / ceiling_ref()
    report = {"machine": {**info, "loadavg_at_end": loadavg()},
              "ceiling": {"n": ceiling_n, "gflops": ceiling_ref() / 1e9, "start_gflops": start_ceiling / 1e9,
                          "end_gflops": end_ceiling / 1e9},
              "settings": {"quick": quick, "compile": args.compile, "rounds": args.rounds, "min_time_s": args.min_time,
                           "iwae_k": args.iwae_k, "iwae_examples": args.iwae_examples, "svi_l": args.svi_l,
                           "svi_examples": args.svi_examples, "svi_steps": list(args.svi_steps)},
              "flop_counting": FLOP_NOTE,
              "results": results, "seconds": time.perf_counter() - started,
              "idle_wait_seconds": timer.waited, "retry_seconds": timer.retry_spent}
    table = markdown(report)
    print()
    print(table)
    print(f"\n({report['seconds']:.0f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
