"""CUDA checks of the decode path on the bundled default: GPU == CPU in fp32, then bf16 decode timings.

    PYTHONPATH=src python scripts/cuda_checks.py     # on a machine with CUDA (falls back to the CPU)

docs/benchmarks.md ("On a GPU") quotes one run of it on a lent NVIDIA H200.
"""
import statistics, time
import torch
from infgen import InfGenPipeline

dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
z = torch.randn(1, 4, 64, 64)
cpu = InfGenPipeline.from_pretrained()
gpu = InfGenPipeline.from_pretrained(device=dev)
for H, W in [(512, 512), (768, 1360)]:
    a = cpu.model.decode(z, H, W)
    b = gpu.model.decode(z.to(dev), H, W).cpu()
    err = (a - b).abs().max().item()
    print(f"fp32 {W}x{H}: max |cpu - {dev}| = {err:.2e}", "OK" if err < 2e-3 else "MISMATCH")
    a = cpu.model.decode(z, H, W, chunk_size=8)
    print(f"  chunked cpu vs {dev}: {(a - b).abs().max().item():.2e}")
bf = InfGenPipeline.from_pretrained(device=dev, dtype=torch.bfloat16)
for H, W in [(2160, 3840), (4320, 7680)]:
    times = []
    for _ in range(4):
        if dev == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with torch.no_grad():
            out = bf.model.decode(z.to(dev), H, W)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else float("nan")
    print(f"bf16 {W}x{H} on {dev}: median of 3 after a warm-up {statistics.median(times[1:]):.3f} s, "
          f"peak allocated {peak:.0f} MiB, output {tuple(out.shape)}")
    if dev == "cpu":
        break
