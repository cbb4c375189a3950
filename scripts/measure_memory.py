"""Peak memory of a ZO step against one inference forward (the scorer's) on the same batch.

    .venv/bin/python scripts/measure_memory.py [--model smollm2-135m] [--batch 16] [--device auto]

Each measurement runs in its own fresh process (same model load, same batch) so neither sees the
other's allocations. CPU: peak resident set while the work runs; CUDA: max allocated bytes.
"""

import argparse
import json
import subprocess
import sys


def measure(kind: str, model: str, batch: int, device: str, dtype: str) -> None:
    import torch

    from metazo.engine import ZeroOrderOptimizer
    from metazo.models import load_model
    from metazo.runtime.memory import peak_memory_bytes
    from metazo.scoring import Scorer
    from metazo.tasks import get_task
    from metazo.trainer import training_batch

    net, tokenizer = load_model(model, dtype=dtype, device=device)
    # On CPU the weights come memory-mapped from the cached safetensors file, and pages the update
    # writes turn from file-backed into private ones, which the resident set counts differently.
    # Copy them into ordinary memory so both processes hold the same weights the same way.
    with torch.no_grad():
        for param in net.parameters():
            param.data = param.data.clone()
    task = get_task("rotten-tomatoes")
    scorer = Scorer(net, tokenizer, task.label_token_ids(tokenizer))
    data = scorer.encode(training_batch(task.train, 0, batch, 0))
    optimizer = ZeroOrderOptimizer(net, lr=1e-6)
    if kind == "forward":
        def work():
            with torch.inference_mode():
                scorer.loss(data)
    else:
        def work():
            optimizer.step(lambda: scorer.loss(data))
    work()  # warm-up: lazy initialisations are not what we measure
    peak = max(peak_memory_bytes(work, scorer.device) for _ in range(3))
    print(json.dumps({"kind": kind, "peak_bytes": peak, "device": str(scorer.device), "tokens": list(data.input_ids.shape)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kind", choices=["forward", "step"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kind:
        return measure(args.kind, args.model, args.batch, args.device, args.dtype)
    results = {}
    for kind in ("forward", "step"):
        out = subprocess.run([sys.executable, __file__, "--kind", kind, "--model", args.model, "--batch", str(args.batch),
                              "--device", args.device, "--dtype", args.dtype], check=True, capture_output=True, text=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    forward, step = results["forward"]["peak_bytes"], results["step"]["peak_bytes"]
    print(f"model {args.model}, {args.dtype}, batch {args.batch} (tokens {results['step']['tokens']}), device {results['step']['device']}")
    print(f"| work | peak MiB |\n| --- | --- |\n| one inference forward (scorer) | {forward / 2**20:.1f} |\n"
          f"| one ZO step (2 forwards + update) | {step / 2**20:.1f} |")
    print(f"ZO step / inference forward: {step / forward:.3f}")


if __name__ == "__main__":
    main()
