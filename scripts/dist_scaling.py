"""Measure ZO fine-tuning across CPU processes (torchrun, gloo): step time and bytes per step.

Runs the same `metazo finetune` as 1 process and as N ranks (data parallel with the whole batch split,
direction parallel with q directions split), one after another, and prints a table: mean step time
(the first step excluded), speed-up against the 1-process 1-thread run with the same q, bytes
each rank sent per step, and what DDP's ring all-reduce of the gradient would send.

    python scripts/dist_scaling.py --model smollm2-135m --steps 6 --batch 16

Runs: 1 process with 1 thread, 1 process with N threads, N ranks with 1 thread each (OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(ranks: int, threads: int, parallel: str, directions: int, args, folder: Path) -> dict:
    output = folder / f"r{ranks}-t{threads}-{parallel}-q{directions}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "metazo", "finetune", "--model", args.model, "--task", args.task, "--steps", str(args.steps),
               "--batch", str(args.batch), "--directions", str(directions), "--parallel", parallel,
               "--eval-every", "0", "--eval-examples", str(args.eval_examples), "--device", "cpu",
               "--output", str(output), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    summary = json.loads((output / "summary.json").read_text())
    info = summary.get("distributed", {})
    return {"ranks": ranks, "threads": threads, "parallel": parallel if ranks > 1 else "-", "q": directions,
            "step_s": summary["step_time_s"], "bytes": info.get("bytes_sent_per_step", 0),
            "ddp_bytes": info.get("ddp_bytes_sent_per_step"), "loss": summary["final_train_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="rotten-tomatoes")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--directions", type=int, default=2, help="q of the direction-parallel comparison")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--eval-examples", type=int, default=8)
    args = parser.parse_args()
    n = args.ranks
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = [run(1, 1, "data", 1, args, folder), run(1, n, "data", 1, args, folder), run(n, 1, "data", 1, args, folder),
                run(1, 1, "data", args.directions, args, folder), run(1, n, "data", args.directions, args, folder),
                run(n, 1, "directions", args.directions, args, folder)]
    print(f"{args.model}, {args.task}, batch {args.batch}, {args.steps} steps, fp32, CPU ({os.cpu_count()} cores)")
    print("| processes x threads | parallel | q | step time (s) | speed-up | bytes sent per rank per step | DDP ring all-reduce, bytes per rank per step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        base = next(r for r in rows if r["ranks"] == 1 and r["threads"] == 1 and r["q"] == row["q"])
        ddp = f"{row['ddp_bytes']:,}" if row["ddp_bytes"] else "-"
        print(f"| {row['ranks']} x {row['threads']} | {row['parallel']} | {row['q']} | {row['step_s']:.2f} | "
              f"{base['step_s'] / row['step_s']:.2f}x | {row['bytes']} | {ddp} |")


if __name__ == "__main__":
    main()
