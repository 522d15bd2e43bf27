"""What a training step costs, per part (data, codec, model, loss networks, optimizer), before and after the
cheap-step changes: each case runs `infgen train` for a few steps and reports the medians of its logged
per-part times (the first log window, warm-up, is dropped). Run it on a quiet machine.

    python scripts/step_cost.py --steps 60 --out docs/training-logs/step-cost.json

Cases: the shipped configs as they ran before (fp32, 1 thread, JPEG decoding in a worker, the perceptual
term on every crop) and the 16-channel configs as they run now (decoded photo pyramids, bf16 autocast on
CPUs with AVX512-BF16/AMX, 2 threads, the perceptual term on a subset), plus each model's bare step
(perceptual and GAN off): the denominator of the "at most 2x the bare step" target. GAN terms are on from
step 0 in the InfGen cases so their cost is counted.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BEFORE = ["train.mixed_precision=no", "train.cpu_threads=1", "data.num_workers=1", "data.cache=null",
          "loss.perceptual_samples=0"]
BARE = ["loss.perceptual=none", "loss.perceptual_weight=0", "loss.gan_weight=0"]
GAN_NOW = ["loss.gan_start=0"]
CASES = {
    "autoencoder before": ("configs/autoencoder-small.yaml", BEFORE),
    "autoencoder after": ("configs/autoencoder-16ch.yaml", []),
    "autoencoder bare (after)": ("configs/autoencoder-16ch.yaml", BARE),
    "infgen before": ("configs/cpu-small.yaml", BEFORE + GAN_NOW + ["codec=src/infgen/assets/default/codec"]),
    "infgen after": ("configs/infgen-16ch.yaml", GAN_NOW),
    "infgen bare (after)": ("configs/infgen-16ch.yaml", BARE),
}
PARTS = ("data", "codec", "model", "loss_nets", "optimizer")


def measure(config: str, sets: list[str], steps: int, log_every: int) -> dict:
    """One `infgen train` process per case (accelerate keeps its precision per process)."""
    with tempfile.TemporaryDirectory() as tmp:
        sets = sets + [f"train.log_every={log_every}", "train.sample_every=0", "train.eval_every=0",
                       f"train.ckpt_every={10 * steps}"]
        cmd = [sys.executable, "-m", "infgen", "train", "--config", config, "--output", tmp,
               "--max-steps", str(steps)] + [a for kv in sets for a in ("--set", kv)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lines = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "s_per_step" in m][1:]                       # drop the warm-up window
    out = {p: statistics.median(m.get(f"t_{p}", 0.0) for m in lines) for p in PARTS}
    out["total"] = statistics.median(m["s_per_step"] for m in lines)
    out["steps"] = steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    ap.add_argument("--codec16", default="runs/autoencoder-16ch/final", help="the 16-channel codec for InfGen")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    a = ap.parse_args()
    results = {}
    for name in a.cases.split(","):
        config, sets = CASES[name]
        if name.startswith("infgen") and "after" in name:
            sets = sets + [f"codec={a.codec16}"]
        results[name] = r = measure(config, sets, a.steps, a.log_every)
        print(name, json.dumps({k: round(v, 3) for k, v in r.items()}), file=sys.stderr)
    print("| case | data | codec | model | loss networks | optimizer | step (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[p]:.3f}" for p in PARTS) + f" | {r['total']:.3f} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
