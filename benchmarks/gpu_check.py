#!/usr/bin/env python
"""The GPU check of airvae's stacked training: throughput of stacked groups against the device's
matmul ceiling measured in the same run, IWAE-5000 and IW-SVI rates, and the projected wall time
of ``airvae reproduce table1 --budget paper`` per dataset. Run by benchmarks/gpu_check.sh (which
first runs the suite's CUDA tests); also runs on a CPU (``--device cpu --quick``) to check itself.

    python benchmarks/gpu_check.py [--device cuda] [--groups 1,8,32,64] [--seconds 1.0] [--out FILE]

Rates: each workload runs for at least ``--seconds`` after a warm-up, synchronized. FLOPs count
the matmuls only, as benchmarks/bench.py does (a training step is 3x the forward pass).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

import torch
from bench import TRAIN_CASES, make_data, stacked_configs
from harness import X_DIM, Z_DIM, arch_flops, matmul_ceiling, sync

from airvae.config import BUDGETS
from airvae.devices import resolve_device
from airvae.estimators import fit_iw_svi, iwae_log_likelihood
from airvae.model import build_vae
from airvae.stacked import StackedModel, stacked_iwae, training_steps

CASES = {c["name"]: c for c in TRAIN_CASES}
# appendix E: validation splits, test splits, iterations; Table 1: 22 configurations per seed in three
# groups (VAE + 7 DVAE(1.0), 7 DVAE(0.5) with two bounds a step, 7 WNI), the paper budget's validations of IWAE-5000,
# 4 selected models evaluated by IW-SVI (k=5000, l=8, T=3000) on the whole test set
PAPER = {"mnist": {"case": "mnist k=1", "valid": 10000, "test": 10000},
         "omniglot": {"case": "mnist k=1", "enc": "d200-d200", "dec": "d200-d200", "valid": 1345, "test": 8070},
         "caltech": {"case": "caltech k=1", "valid": 2264, "test": 2307}}
TABLE1_GROUPS = (8, 7, 7)  # runs per group per seed; the middle group evaluates two bounds per step
VALIDATIONS, VAL_K = BUDGETS["paper"].validations, BUDGETS["paper"].val_k  # airvae's paper budget, not a copy
SVI = {"k": 5000, "l": 8, "steps": 3000}


def rate(fn, device, seconds: float, units: float = 1.0) -> float:
    """Calls of ``fn`` per second (times ``units``), after one warm-up call."""
    fn()
    sync(device)
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync(device)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and calls >= 3:
            return calls * units / elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--groups", default="1,8,32,64", help="runs per stacked group")
    p.add_argument("--seconds", type=float, default=1.0, help="minimum time per measurement")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script, not the device")
    p.add_argument("--compile", action="store_true", help="also time the target group (21 runs) with torch.compile")
    p.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = p.parse_args()
    device = resolve_device(args.device)
    groups = [int(g) for g in args.groups.split(",")]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "groups": groups, "rows": []}
    torch.backends.cuda.matmul.allow_tf32 = False  # airvae's default: fp32 products
    ceiling = matmul_ceiling(device, 2048 if args.quick or device.type == "cpu" else 8192, 5)
    report["fp32_ceiling_tflops"] = ceiling / 1e12
    print(f"device: {report['device']}; fp32 matmul ceiling {ceiling / 1e12:.1f} TFLOP/s (measured now)\n")

    # 1. Training throughput of stacked groups
    print("| case | runs per group | group steps/s | run-steps/s | % of ceiling | vs one run alone |")
    print("|---|---:|---:|---:|---:|---:|")
    cases = ["mnist k=1", "mnist k=64", "caltech k=1"]
    rates = {}
    for name in cases:
        case = dict(CASES[name], k=8) if args.quick and name == "mnist k=64" else CASES[name]
        enc_f, dec_f = arch_flops(case["enc"], case["dec"])
        flops = 3 * case["batch"] * (enc_f + case["k"] * dec_f)  # per run-step
        data = make_data(case["batch"] * 2, device)
        alone = None
        for r in groups:
            group_step, single_step = training_steps(stacked_configs(case, r, device), data, device)
            if alone is None:
                alone = rate(single_step, device, args.seconds)
            group_rate = rate(group_step, device, args.seconds)
            rates[(name, r)] = group_rate
            row = {"case": name, "runs": r, "group_steps_per_s": group_rate, "run_steps_per_s": group_rate * r,
                   "pct_ceiling": 100 * group_rate * r * flops / ceiling, "alone_steps_per_s": alone}
            report["rows"].append(row)
            print(f"| {name} | {r} | {group_rate:.1f} | {group_rate * r:.0f} | {row['pct_ceiling']:.1f} | "
                  f"{group_rate * r / alone:.2f}x |", flush=True)
            del group_step, single_step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.compile:
        case = CASES["mnist k=1"]
        group_step, _ = training_steps(stacked_configs(case, 21, device), make_data(200, device), device, compile=True)
        started = time.perf_counter()
        group_step()
        sync(device)
        report["compiled_21"] = {"compile_seconds": time.perf_counter() - started,
                                 "group_steps_per_s": rate(group_step, device, args.seconds)}
        print(f"\nmnist k=1, 21 runs, torch.compile (CUDA graphs on a GPU): "
              f"{report['compiled_21']['group_steps_per_s']:.0f} group-steps/s "
              f"(compiling took {report['compiled_21']['compile_seconds']:.0f} s); target >= 1500")

    # 2. Evaluation throughput (MNIST architecture): IWAE-5000, stacked validation, IW-SVI
    n_eval = 16 if args.quick else 200
    x = make_data(n_eval, device)
    torch.manual_seed(0)
    model = build_vae(X_DIM, Z_DIM, "d300-d300", "d300-d300").to(device).eval()
    k = 100 if args.quick else VAL_K
    iwae = rate(lambda: iwae_log_likelihood(model, x, k), device, args.seconds, n_eval)
    runs = 8
    group = StackedModel([build_vae(X_DIM, Z_DIM, "d300-d300", "d300-d300").to(device) for _ in range(runs)], device)
    stacked = rate(lambda: stacked_iwae(group, list(range(runs)), x, k, list(range(runs))), device, args.seconds,
                   n_eval * runs)
    svi_steps = 5 if args.quick else 20
    svi = rate(lambda: fit_iw_svi(model, x, l=SVI["l"], steps=svi_steps), device, args.seconds, n_eval * svi_steps)
    report.update(iwae_examples_per_s=iwae, stacked_validation_examples_per_s=stacked, iwsvi_example_steps_per_s=svi)
    print(f"\nIWAE-{k}: {iwae:.1f} examples/s (one model); stacked validation ({runs} runs): {stacked:.1f} "
          f"run-examples/s; IW-SVI (l={SVI['l']}): {svi:.0f} example-steps/s ({svi / n_eval:.1f} steps/s "
          f"for {n_eval} examples)")

    # 3. Projected wall time of `airvae reproduce table1 --budget paper`, one seed, per dataset
    print("\n| dataset | training | validation | test IW-SVI | total |")
    print("|---|---:|---:|---:|---:|")
    largest = max(groups)
    for dataset, spec in PAPER.items():
        name = spec["case"]
        iterations = CASES[name]["T"]
        # a group of R runs trains at the measured rate of the nearest measured size (>= R when possible)
        def group_seconds(size, bounds=1, iterations=iterations, name=name):
            measured = min((r for r in groups if r >= size), default=largest)
            return iterations / (rates[(name, measured)] * measured / size) * bounds
        train_s = sum(group_seconds(size, 2 if i == 1 else 1) for i, size in enumerate(TABLE1_GROUPS))
        scale = arch_scale(spec) if "enc" in spec else 1.0  # OMNIGLOT's d200 layers on MNIST's measurement
        runs_total = sum(TABLE1_GROUPS)
        val_s = VALIDATIONS * spec["valid"] * runs_total / stacked * scale * (VAL_K / k)
        test_s = 4 * spec["test"] * SVI["steps"] / svi * scale
        train_s *= scale
        total = train_s + val_s + test_s
        report.setdefault("projection_hours", {})[dataset] = {"train": train_s / 3600, "validation": val_s / 3600,
                                                              "test": test_s / 3600, "total": total / 3600}
        print(f"| {dataset} | {train_s / 3600:.2f} h | {val_s / 3600:.2f} h | {test_s / 3600:.2f} h | "
              f"{total / 3600:.2f} h |")
    if args.quick:
        print("\n(--quick: small sizes; the projection is not meaningful)")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwritten {args.out}")
    return 0


def arch_scale(spec: dict) -> float:
    """FLOPs of an architecture relative to MNIST's, for projecting from MNIST's measurements."""
    enc, dec = arch_flops(spec["enc"], spec["dec"])
    menc, mdec = arch_flops("d300-d300", "d300-d300")
    return (enc + dec) / (menc + mdec)


if __name__ == "__main__":
    sys.exit(main())
