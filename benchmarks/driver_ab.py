#!/usr/bin/env python
"""Is the step every airvae run now takes (airvae.driver.SingleEngine) as fast as the step airvae's
trainer took before the driver? Both timed side by side, interleaved in rounds, in one run.

    python benchmarks/driver_ab.py [--cases "mnist k=1,caltech k=1"] [--rounds 5] [--out FILE.json]

"before": the loop body of airvae's trainer before the driver (and bench.py's airvae row until
then): the learning rate of eq. 43 set per step, the minibatch by index from resident data,
air_objective, ``loss.item()`` every step (its divergence check), fused Adam. "driver": bench.py's
airvae row today, SingleEngine.step, whose loss stays on the device until the driver validates.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from bench import TRAIN_CASES, airvae_train_step, make_data, run_config  # noqa: E402
from harness import Timer  # noqa: E402

from airvae.driver import MinibatchSchedule, fast_adam_options  # noqa: E402
from airvae.model import air_objective  # noqa: E402
from airvae.model import model_from_config  # noqa: E402


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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="mnist k=1,mnist k=8,caltech k=1")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per workload per round")
    p.add_argument("--out", help="JSON output path")
    args = p.parse_args(argv)
    device = torch.device("cpu")
    timer, results = Timer(device, retry_budget_s=30.0), []
    for case in TRAIN_CASES:
        if case["name"] not in [c.strip() for c in args.cases.split(",")]:
            continue
        data = make_data(case["n_train"], device)
        fns = {"before": before_driver_step(case, device, data), "driver": airvae_train_step(case, device, data)}
        for fn in fns.values():
            for _ in range(50):
                fn()  # warm up: the first calls allocate (the allocator's cache, Adam's state)
        r = timer.compare(fns, args.rounds, args.min_time)
        row = {"case": case["name"], **{name: m["rate"] for name, m in r.items()},
               "contended": any(m["contended"] for m in r.values())}
        row["driver/before"] = row["driver"] / row["before"]
        results.append(row)
        print(f"{case['name']:14s} before {row['before']:8.1f} steps/s   driver {row['driver']:8.1f} steps/s   "
              f"driver/before {row['driver/before']:.3f}{'   (contended)' if row['contended'] else ''}")
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": results}, indent=2) + "\n")
    return {"rows": results}


if __name__ == "__main__":
    main()
