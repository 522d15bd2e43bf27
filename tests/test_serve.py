"""`infgen serve`: the request logic without a browser, then the real page in headless Chromium.

The browser test starts `python -m infgen serve` with the tiny bundle on a free port, drives the page the way
a user does (upload, pick 2x, click, download), checks the PNG against InfGenPipeline.upscale, then sends bad
uploads and checks that the message shows and the next good request still works. Every request the page
makes must stay on 127.0.0.1 (the demo is offline: no analytics, CDN or font downloads).

Needs Debian's Chromium (`apt-get install -y chromium`; the Makefile's test target installs it). Without it
the browser test is skipped, or fails when INFGEN_REQUIRE_BROWSER=1 (CI).
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the demo needs the optional extra: pip install 'infgen[demo]'")
from infgen import serve  # noqa: E402
from infgen.pipeline import InfGenPipeline  # noqa: E402

CHROMIUM = os.environ.get("INFGEN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-proxy-server"]


def photo(path: Path, width: int = 48, height: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming width x height, with no pixel data: a decompression bomb's signature."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def pipe(tiny_bundle) -> InfGenPipeline:
    return InfGenPipeline.from_pretrained(tiny_bundle)


@pytest.fixture
def worker(pipe, tmp_path):
    return serve.Upscaler(pipe, serve.ServeLimits(max_pixels=200 * 200, max_input_pixels=100_000, max_upload_mb=0.01),
                          tmp_path / "out")


# -- the request logic -------------------------------------------------------------------------------------
def test_output_size():
    assert serve.output_size("2x", 48, 40) == (96, 80)
    assert serve.output_size("1080p (1920x1080)", 160, 90) == (1920, 1080)
    assert serve.output_size("1080p (1920x1080)", 160, 90, keep_aspect=False) == (1920, 1080)
    assert serve.output_size("4K (3840x2160)", 400, 300) == (2880, 2160)         # 4:3 fits by height
    assert serve.output_size("4K (3840x2160)", 300, 400) == (2160, 2880)         # portrait: upright box
    assert serve.output_size("8K (7680x4320)", 300, 400, keep_aspect=False) == (7680, 4320)
    assert serve.output_size("custom", 48, 40, 123, 45.0) == (123, 45)
    for bad in [(0, 10), (10, None), (12.5, 10), (-3, 4)]:
        with pytest.raises(serve.RequestError, match="custom (width|height) must be a whole number"):
            serve.output_size("custom", 48, 40, *bad)
    with pytest.raises(serve.RequestError, match="unknown size preset"):
        serve.output_size("3x", 48, 40)


@pytest.mark.parametrize("name, make, message", [
    ("empty.png", lambda p: p.write_bytes(b""), "the file is empty"),
    ("notes.png", lambda p: p.write_text("not an image, just text\n"), "is not a readable image"),
    ("cut.png", lambda p: p.write_bytes(photo(p).read_bytes()[:300]), "cannot decode the image data"),
    ("bomb.png", lambda p: png_header_only(p, 100_000, 100_000), "above the input limit"),
    ("huge.png", lambda p: photo(p, 300, 300), "above the 0.01 MB upload limit"),
])
def test_bad_uploads_get_a_message(worker, tmp_path, name, make, message):
    path = tmp_path / "gradio-upload-dir" / name
    path.parent.mkdir()
    make(path)
    result, status, download = worker.upscale(str(path), "2x", None, None, True)
    assert result is None and status.startswith("Error: ") and message in status, status
    assert name in status and str(path.parent) not in status, "name the upload, not the server's temp path"
    assert download["visible"] is False
    _, preview_status = worker.preview(str(path))
    assert preview_status.startswith("Upload rejected: ") and message in preview_status


def test_good_request_matches_pipeline(worker, pipe, tmp_path):
    src = photo(tmp_path / "good.png")
    assert worker.preview(str(src))[1] == "good.png: 48x40 px"
    result, status, download = worker.upscale(str(src), "2x", None, None, True)
    assert status.startswith("48x40 -> 96x80 px"), status
    assert download["value"] == result and Path(result).parent == worker.outdir
    expected = np.asarray(pipe.upscale(Image.open(src).convert("RGB"), 80, 96))
    np.testing.assert_array_equal(np.asarray(Image.open(result)), expected)  # PNG is lossless


def test_limits_output_pixels_and_time(worker, pipe, tmp_path):
    src = photo(tmp_path / "good.png")
    _, status, _ = worker.upscale(str(src), "custom", 300, 200, True)
    assert status.startswith("Error: 300x200 = 0.1 MP is above this server's limit of 0.0 MP (40000 pixels)"), status
    worker.limits.timeout_s = 1e-6
    _, status, _ = worker.upscale(str(src), "2x", None, None, True)
    assert status.startswith("Error: the decode ran longer than the 1e-06 s limit"), status
    hooks = sum(len(m._forward_pre_hooks) for root in (pipe.model, pipe.codec) for m in root.modules())
    assert hooks == 0, "the deadline hooks must be removed after a timeout"
    worker.limits.timeout_s = 60
    assert worker.upscale(str(src), "2x", None, None, True)[1].startswith("48x40 -> 96x80 px")


def test_build_app_with_and_without_samples(pipe, tmp_path):
    (tmp_path / "samples").mkdir()
    photo(tmp_path / "samples" / "a.jpg")
    for samples_dir in (tmp_path / "samples", tmp_path / "missing", None):
        demo = serve.build_app(pipe, outdir=tmp_path / "out", samples_dir=samples_dir)
        assert isinstance(demo, gr.Blocks)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from infgen.cli import main
    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err


# -- the real page in a real browser -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    """`python -m infgen serve` on a free port; yields its URL, stops it afterwards."""
    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(tmp / "gradio"),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "infgen", "serve", "--checkpoint", str(tiny_bundle),
                             "--port", str(port), "--timeout", "60", "--max-upload-mb", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    end = time.monotonic() + 300  # importing torch + gradio takes a while on a busy 2-core machine
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"infgen serve exited with {proc.returncode}:\n{log.read()}")
        try:
            if opener.open(url, timeout=2).status == 200:
                break
        except OSError:
            pass
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("infgen serve did not answer within 300 s")
        time.sleep(0.5)
    yield proc, url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        reason = f"{CHROMIUM} is missing; install it with: apt-get install -y chromium (make test does)"
        if os.environ.get("INFGEN_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_page_upscale_download_and_bad_uploads(server, browser, pipe, tmp_path):
    proc, url = server
    good = photo(tmp_path / "good.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")

    context = browser.new_context(accept_downloads=True)
    outside = []  # every request that would leave the machine; all are blocked

    def route(r):
        if r.request.url.startswith(url.rstrip("/")) or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()
    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(120_000)
    page.goto(url)
    status = page.locator("#status textarea")
    page.locator("#run").wait_for()

    def upload(path: Path):
        clear = page.locator("#upload button[aria-label='Clear']")
        if clear.count():
            clear.click()
            page.locator("#upload input[type=file]").wait_for(state="attached")
        page.locator("#upload input[type=file]").set_input_files(str(path))

    shown = []  # result image URLs: each request must show a new one

    def decode_good(n: int) -> None:
        upload(good)
        page.wait_for_function("() => document.querySelector('#status textarea').value === 'good.png: 48x40 px'")
        page.get_by_label("2x", exact=True).check()
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#status textarea').value.startsWith('48x40 -> ')")
        assert status.input_value().startswith("48x40 -> 96x80 px"), status.input_value()
        page.wait_for_function("() => { const i = document.querySelector('#result img');"
                               " return i !== null && i.complete && i.naturalWidth > 0 }")
        size = page.locator("#result img").evaluate("img => [img.naturalWidth, img.naturalHeight, img.src]")
        assert size[:2] == [96, 80] and size[2] not in shown, size
        shown.append(size[2])
        with page.expect_download() as d:
            page.locator("#download").click()
        saved = tmp_path / f"download{n}.png"
        d.value.save_as(saved)
        with Image.open(saved) as im:
            assert (im.format, im.size) == ("PNG", (96, 80))
            expected = np.asarray(pipe.upscale(Image.open(good).convert("RGB"), 80, 96))
            diff = np.abs(np.asarray(im.convert("RGB")).astype(int) - expected).max()
            assert diff <= 1, f"downloaded PNG differs from InfGenPipeline.upscale by {diff}"  # thread-count rounding

    decode_good(0)
    for bad, message in [(empty, "the file is empty (0 bytes)"), (text, "is not a readable image")]:
        upload(bad)
        page.wait_for_function("() => document.querySelector('#status textarea').value.startsWith('Upload rejected: ')")
        page.locator("#run").click()
        page.wait_for_function("() => document.querySelector('#status textarea').value.startsWith('Error: ')")
        assert message in status.input_value() and bad.name in status.input_value(), status.input_value()
        assert not page.locator("#download").is_visible()
        assert proc.poll() is None, "the server died on a bad upload"
    decode_good(1)  # the server still serves after bad requests

    assert outside == [], f"the page tried to reach the network: {outside}"
    context.close()
