"""Every shipped config in configs/ runs, as its header documents, from a directory that holds only what a
fresh clone has (configs/ and the committed checkpoints/; no runs/, no data/): one step each on tiny photos,
with the sizes overridden. Configs that need a run of another config find its export there, because the
prerequisite runs first, as documented; a missing prerequisite is one line naming the config that makes it."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infgen.cli import main

REPO = Path(__file__).resolve().parents[1]
# Documented order: each config's prerequisites (codec, init_from) come from configs earlier in the list.
ORDER = ["autoencoder-small.yaml", "autoencoder-16ch.yaml", "cpu-small.yaml", "infgen-16ch.yaml",
         "paper-stage1.yaml", "paper-stage2.yaml"]
# mixed_precision stays auto: accelerate keeps one precision per process, and the other training tests use auto.
TINY = ["data.root=null", "data.input_size=32", "data.out_min=32", "data.out_max=64", "data.batch_size=1",
        "data.num_workers=0", "data.cache=null", "data.val_source=null", "data.preview_source=null",
        "train.max_steps=1", "train.ckpt_every=1", "train.sample_every=0", "train.eval_every=0",
        "train.log_every=1", "optim.warmup_steps=1"]


def test_order_covers_every_shipped_config():
    assert sorted(ORDER) == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.fixture
def clone(tmp_path, monkeypatch) -> Path:
    """A working directory with what a fresh clone has, plus six tiny photos in photos/."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    os.symlink(REPO / "checkpoints", tmp_path / "checkpoints")
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i in range(6):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        small.resize((128, 96), Image.BICUBIC).save(tmp_path / "photos" / f"p{i}.jpg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def sd_vae_stand_in(path: Path) -> str:
    """An f8 diffusers AutoencoderKL with random weights, in place of the hub's sd-vae-ft-ema (no internet)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[8, 8, 8, 8], norm_num_groups=8, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4).save_pretrained(path)
    return str(path)


def run(config: str, *sets: str) -> int:
    args = ["train", "--config", f"configs/{config}", "--data", "photos"]
    for s in (*TINY, *sets):
        args += ["--set", s]
    return main(args)


def test_every_config_runs_one_step_in_a_fresh_clone(clone, capsys):
    # The paper configs name the hub's SD-VAE and LPIPS (GPU machines with internet); offline they get a
    # random f8 AutoencoderKL and the VGG19 features instead, and stage 1 a shallower model for speed.
    vae = sd_vae_stand_in(clone / "sd-vae")
    paper = ["render_cells=4", f"codec={vae}", "loss.perceptual=vgg19"]
    extra = {"cpu-small.yaml": ["render_cells=4"], "infgen-16ch.yaml": ["render_cells=4"],
             "paper-stage1.yaml": [*paper, "model.overrides.depth=1"], "paper-stage2.yaml": paper}
    for config in ORDER:
        assert run(config, *extra.get(config, [])) == 0, f"{config}: {capsys.readouterr().err[-2000:]}"
    for out in ("autoencoder", "autoencoder-16ch", "infgen-small", "infgen-16ch", "paper-stage1", "paper-stage2"):
        assert (clone / "runs" / out / "final" / "model.safetensors").is_file(), out


def test_a_missing_prerequisite_names_the_config_that_makes_it(clone, capsys):
    assert run("cpu-small.yaml", "render_cells=4") == 2
    err = capsys.readouterr().err
    assert err.strip() == ("infgen train: error: codec runs/autoencoder/final does not exist; it is the export of "
                           "`infgen train --config configs/autoencoder-small.yaml`: run that first")
    assert not (clone / "runs" / "infgen-small").exists()


def test_a_missing_local_codec_is_never_sent_to_the_hub(clone, capsys, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub contacted"))
    assert run("cpu-small.yaml", "codec=checkpoints/no-such-codec") == 2
    assert "codec checkpoints/no-such-codec does not exist" in capsys.readouterr().err


def test_no_codec_uses_the_bundled_default_and_says_so(clone, capsys):
    assert run("cpu-small.yaml", "codec=null", "render_cells=4") == 0
    err = capsys.readouterr().err
    assert "no codec given: using the bundled default's" in err
