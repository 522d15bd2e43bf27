"""`infgen bench`: the --quick harness end to end, plus the pieces whose logic decides what the docs claim
(exponent fit, skip budget, targets, doc section replacement)."""
import argparse
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from infgen import bench, bench_report
from infgen.cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    doc = out / "bench.md"
    doc.write_text("# Benchmarks\n\nMethod text that the bench must keep.\n")
    assert main(["bench", "--quick", "--out", str(out), "--doc", str(doc)]) == 0
    return out, doc, json.loads((out / "bench.json").read_text())


def test_quick_json_has_machine_peak_and_every_case(quick):
    out, _, res = quick
    m = res["machine"]
    assert m["cpu_model"] and m["logical_cores"] >= 1 and m["torch_threads"] >= 1 and m["ram_bytes"] > 0
    assert m["torch_version"] == torch.__version__
    assert res["matmul_peak"]["flops_per_s"] > 0 and len(res["matmul_peak"]["seconds_all"]) == 10
    sizes = {(128, 128), (192, 256)}
    for model in ("tiny", "sd-vae", "codec+bicubic"):
        rows = [c for c in res["cases"] if c["model"] == model]
        assert {(c["height"], c["width"]) for c in rows} == sizes, model
        for c in rows:
            assert c["status"] == "ok", c
            assert c["seconds"] > 0 and len(c["seconds_all"]) == 1 and c["flops"] > 0
            assert c["output_bytes"] == 3 * c["height"] * c["width"] * 4
            assert c["memory"]["output_bytes"] == c["output_bytes"] and c["memory"]["peak_bytes"] >= 0
            assert 0 < c["fraction_of_peak"]
    tiny = [c for c in res["cases"] if c["model"] == "tiny"]
    for c in tiny:  # the transformer/decoder split covers the whole decode
        parts = c["parts_seconds"]
        assert parts["transformer"] > 0 and parts["decoder"] > 0
        assert math.isclose(parts["transformer"] + parts["decoder"] + parts["other"], c["seconds"], rel_tol=1e-9)
        assert c["flops_parts"]["transformer"] + c["flops_parts"]["decoder"] == c["flops"]
        assert c["transformer_fraction_of_peak"] > 0 and c["decoder_fraction_of_peak"] > 0
    assert {(r["model"], r["baseline"]) for r in res["ratios"]} == {("tiny", "sd-vae"), ("tiny", "codec+bicubic")}
    assert {t["status"] for t in res["targets"]} <= {"met", "missed", "not measured"}
    assert len(res["targets"]) == 5 and "tiny" in res["fits"]


def test_quick_writes_png_and_doc_section(quick):
    out, doc, res = quick
    png = out / "bench.png"
    assert res["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nMethod text that the bench must keep.")
    assert text.count(bench_report.DOC_BEGIN) == 1 and text.count(bench_report.DOC_END) == 1
    assert "| target | measured | threshold | status |" in text
    assert "| tiny | 128x128 |" in text and "![time and peak memory vs megapixels](bench.png)" in text


def test_write_doc_replaces_only_the_marked_section(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text(f"before\n{bench_report.DOC_BEGIN}\nold numbers\n{bench_report.DOC_END}\nafter\n")
    bench_report.write_doc(doc, f"{bench_report.DOC_BEGIN}\nnew numbers\n{bench_report.DOC_END}")
    assert doc.read_text() == f"before\n{bench_report.DOC_BEGIN}\nnew numbers\n{bench_report.DOC_END}\nafter\n"
    fresh = tmp_path / "new" / "c.md"
    bench_report.write_doc(fresh, f"{bench_report.DOC_BEGIN}\nx\n{bench_report.DOC_END}")
    assert fresh.read_text().count(bench_report.DOC_BEGIN) == 1


@pytest.mark.parametrize("k", [0.5, 1.0, 1.37, 2.0])
def test_fit_exponent_recovers_a_known_power_law(k):
    mp = np.array([1.05, 2.07, 4.19, 8.29, 16.8, 33.2])
    assert bench_report.fit_exponent(mp, 0.3 * mp ** k) == pytest.approx(k, abs=1e-9)


def test_fit_exponent_sees_fixed_costs_and_rejects_one_size():
    mp = np.array([1.0, 4.0, 16.0, 33.0])
    assert bench_report.fit_exponent(mp, 5.0 + 0.1 * mp) < 0.9  # a fixed cost flattens the curve
    with pytest.raises(ValueError, match="2 distinct sizes"):
        bench_report.fit_exponent([2.0, 2.0], [1.0, 1.1])


class _Matmul(bench.Subject):
    """A stand-in model whose cost is one matmul per 8x8 cell batch: fast, with countable FLOPs."""
    name = kind = "fake"

    def __init__(self, required=()):
        self.required = set(required)
        self.phases = bench.PhaseTimer(None, lambda: None)

    def prepare(self, height, width):
        a, w = torch.randn(bench._cells(height, width), 64), torch.randn(64, 64)
        return lambda: (a @ w).sum() + torch.zeros(1, 3, height, width)


def _opts(**kw):
    base = dict(sizes=[(64, 64), (512, 512), (1024, 1024)], repeats=2, max_seconds=1e-6, compile=False,
                device=torch.device("cpu"), memory="off")
    return argparse.Namespace(**{**base, **kw})


def test_cases_over_the_budget_are_skipped_with_a_prediction_unless_required():
    rows = bench.bench_subject(_Matmul(required={(1024, 1024)}), _opts(), peak=1e9)
    assert [r["status"] for r in rows] == ["ok", "skipped", "ok"]
    first, skipped = rows[0], rows[1]
    assert len(first["seconds_all"]) == 2 and first["flops"] == 2 * 64 * 64 * 64
    assert skipped["predicted"]["seconds"] > 1e-6 and "--max-seconds" in skipped["reason"]
    assert skipped["predicted"]["flops"] == first["flops"] * bench._cells(512, 512) // bench._cells(64, 64)
    everything = bench.bench_subject(_Matmul(), _opts(max_seconds=1e9), peak=1e9)
    assert [r["status"] for r in everything] == ["ok", "ok", "ok"]


def _row(model, h, w, seconds, peak=None, kind="infgen", **kw):
    r = dict(model=model, kind=kind, height=h, width=w, size=f"{w}x{h}", megapixels=h * w / 1e6, status="ok",
             seconds=seconds, output_bytes=3 * h * w * 4, **kw)
    if peak is not None:
        r["memory"] = dict(peak_bytes=peak, output_bytes=3 * h * w * 4)
    return r


def test_targets_met_and_missed():
    out8k = 3 * 4320 * 7680 * 4
    cases = [_row("small", 1080, 1920, 1.0, peak=100 << 20), _row("small", 2160, 3840, 4.0),
             _row("small", 4320, 7680, 16.0, peak=(150 << 20) + out8k, transformer_fraction_of_peak=0.6,
                  transformer_flops_per_s=6e10),
             _row("base", 768, 768, 30.0), _row("sd-vae", 768, 768, 20.0, kind="sd-vae")]
    fit = bench_report.fits(cases)
    assert fit["small"]["exponent"] == pytest.approx(1.0) and fit["small"]["in_target_range"]
    got = {t["id"]: t["status"] for t in bench_report.targets(cases, fit, ["small", "base"])}
    assert got == {"linear:small": "met",             # exponent 1.0 <= 1.1
                   "linear:base": "not measured",
                   "memory:small": "met",             # 150 MiB + 8K output <= 1.5 x 100 MiB + 8K output
                   "memory:base": "not measured",
                   "small-4k": "met",                 # 4 s <= 20 s
                   "base-vs-sd-vae": "missed",        # 30 s > 20 s
                   "transformer-peak:small": "met",   # 60% >= 50%
                   "transformer-peak:base": "not measured"}
    cases[2]["memory"]["peak_bytes"] = (151 << 20) + out8k
    cases[2]["transformer_fraction_of_peak"] = 0.49
    got = {t["id"]: t["status"] for t in bench_report.targets(cases, fit, ["small"])}
    assert got["memory:small"] == "missed" and got["transformer-peak:small"] == "missed"
    assert all(t["status"] == "not measured" for t in bench_report.targets(cases, fit, ["small"], latent=16))


def test_sdpa_flops_are_counted_on_cpu():
    q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 6, 8)
    with torch.inference_mode(), bench.FlopCounterMode(display=False, custom_mapping=bench.SDPA_FLOPS) as c:
        torch.nn.functional.scaled_dot_product_attention(q, k, k)
    assert c.get_total_flops() == 2 * (2 * 2 * 10 * 6 * 8)


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "0x5"], "width and height must be >= 1"),
    (["--presets", "huge"], "unknown preset 'huge'"),
    (["--baselines", "taesd"], "unknown baseline 'taesd'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main(["bench", "--quick", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys, tmp_path):
    assert main(["bench", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_quick_on_cuda(dtype, tmp_path):
    baselines = "sd-vae,codec" if importlib.util.find_spec("diffusers") else "codec"  # diffusers is an extra
    assert main(["bench", "--quick", "--device", "cuda", "--dtype", dtype, "--baselines", baselines,
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["machine"]["gpu"] and all(c["status"] == "ok" for c in res["cases"])
    assert all(c["memory"]["method"].startswith("torch.cuda.max_memory_allocated") for c in res["cases"])
    assert all(c["output_bytes"] == 3 * c["height"] * c["width"] * 2 for c in res["cases"])


def test_missing_diffusers_fails_before_any_case(monkeypatch, capsys, tmp_path):
    """The sd-vae baseline needs diffusers; without it the bench stops at once, says how to go on, writes nothing."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert main(["bench", "--quick", "--out", str(tmp_path / "b")]) == 2
    captured = capsys.readouterr()
    assert "--baselines codec" in captured.err and "tiny " not in captured.out
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(bench.tempfile, "mkdtemp", lambda *a, **k: pytest.fail("made a temp dir before failing"))
    assert main(["bench", "--quick"]) == 2                                    # no --out: no temp dir either


def test_pipeline_bench_times_every_stage_of_the_user_path(tmp_path, tiny_bundle):
    """--pipeline: InfGenPipeline.upscale of the demo photo, per stage, and the one-pass decode; doc section."""
    from infgen import bench_pipeline
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    assert main(["bench", "--pipeline", "--checkpoint", str(tiny_bundle), "--sizes", "64x48,256x144",
                 "--out", str(tmp_path), "--doc", str(doc)]) == 0
    rows = json.loads((tmp_path / "pipeline.json").read_text())["rows"]
    assert [r["size"] for r in rows][:2] == ["64x48", "256x144"]
    small, big = rows[0], rows[1]          # tiny bundle: 8-cell training latents, max scale 2
    assert [s["stage"] for s in small["stages"]] == ["encode", "decode"] and small["extrapolation_steps"] == 0
    assert [s["stage"] for s in big["stages"]] == ["encode", "decode", "encode", "decode"]
    assert big["extrapolation_steps"] == 1
    assert all(s["seconds"] > 0 for r in rows for s in r["stages"]) and big["one_pass_seconds"] > 0
    assert sum(s["seconds"] for s in big["stages"]) <= big["seconds"] * 1.01
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and text.count(bench_pipeline.DOC_BEGIN) == 1
    assert "| fp32" in text and "| 256x144 |" in text


def test_a_bundle_that_is_not_small_times_the_preset(capsys):
    """The shipped bundle is `small` + a base decoder on 16-channel latents: the default bench times the
    `small` preset (it stopped with an error before), while an explicit --checkpoint of another
    architecture is still refused."""
    from argparse import Namespace
    from infgen.pipeline import DEFAULT_BUNDLE
    o = Namespace(checkpoint=None, quick=False, presets=["small"], baselines=[], latent=64)
    (spec,) = bench._specs(o)
    assert spec["preset"] == "small" and spec["weights"] is None
    assert "not the `small` preset; timing `small` with random weights" in capsys.readouterr().err
    with pytest.raises(ValueError, match="its config is not the `small` preset"):
        bench._specs(Namespace(**{**vars(o), "checkpoint": str(DEFAULT_BUNDLE)}))
