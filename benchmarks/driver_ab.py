#!/usr/bin/env python
"""Is the step every airvae run now takes (airvae.driver.SingleEngine) as fast as the step airvae's
trainer took before the driver? Both timed side by side, interleaved in rounds, in one run.

    python benchmarks/driver_ab.py [--cases "mnist k=1,caltech k=1"] [--blocks 20] [--out FILE.json]

Each step's cost is measured as this process's CPU time (one thread), in interleaved blocks
alternating which variant goes first; the medians are compared.

"before": the loop body of airvae's trainer before the driver (and bench.py's airvae row until
then): the learning rate of eq. 43 set per step, the minibatch by index from resident data,
air_objective, ``loss.item()`` every step (its divergence check), fused Adam. "driver": bench.py's
airvae row today, SingleEngine.step, whose loss stays on the device until the driver validates.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch
from bench import TRAIN_CASES, airvae_train_step, make_data, run_config

from airvae.driver import MinibatchSchedule, fast_adam_options
from airvae.model import air_objective, model_from_config


def before_driver_step(case: dict, device: torch.device, data: torch.Tensor):
    """The trainer's step as it was before the driver (see the module docstring)."""
    cfg = run_config(case, device)
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, **fast_adam_options(device))
    schedule = MinibatchSchedule(data.shape[0], cfg.batch_size, seed=cfg.seed, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    state = {"step": 0}

    def step():
        t = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(t)
        loss = -air_objective(model, data[schedule.indices(t)], cfg.k, cfg.m, cfg.regularizer.alpha,
                              generator=generator).mean()
        if not math.isfinite(loss.item()):
            raise RuntimeError("benchmark model diverged")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["step"] = t + 1

    return step


def cpu_seconds_per_step(fn, steps: int) -> float:
    """This process's CPU time per call of ``fn`` over ``steps`` calls: what a step costs, much less
    disturbed than wall time when other processes share the cores (they take turns, not cycles)."""
    t0 = time.process_time()
    for _ in range(steps):
        fn()
    return (time.process_time() - t0) / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="mnist k=1,mnist k=8,caltech k=1")
    p.add_argument("--blocks", type=int, default=20, help="interleaved blocks per workload")
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--out", help="JSON output path")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one core: CPU time is then the step's cost, not a share of two
    device, results = torch.device("cpu"), []
    for case in TRAIN_CASES:
        if case["name"] not in [c.strip() for c in args.cases.split(",")]:
            continue
        data = make_data(case["n_train"], device)
        fns = {"before": before_driver_step(case, device, data), "driver": airvae_train_step(case, device, data)}
        for fn in fns.values():
            for _ in range(50):
                fn()  # warm up: the first calls allocate (the allocator's cache, Adam's state)
        times = {name: [] for name in fns}
        for block in range(args.blocks):
            order = list(fns) if block % 2 == 0 else list(reversed(fns))  # neither always goes first
            for name in order:
                times[name].append(cpu_seconds_per_step(fns[name], args.steps))
        row = {"case": case["name"], **{f"{name}_steps_per_cpu_s": 1 / statistics.median(t) for name, t in times.items()}}
        row["driver/before"] = statistics.median(times["before"]) / statistics.median(times["driver"])
        results.append(row)
        print(f"{case['name']:14s} before {row['before_steps_per_cpu_s']:8.1f}  driver {row['driver_steps_per_cpu_s']:8.1f} "
              f"steps per CPU second   driver/before {row['driver/before']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"method": "median CPU time per step over interleaved blocks, 1 thread",
                                              "blocks": args.blocks, "steps": args.steps, "rows": results},
                                             indent=2) + "\n")
    return {"rows": results}


if __name__ == "__main__":
    main()
