"""Training checkpoints that resume exactly, and the RNG streams they record.

    CHECKPOINTS/step-000001000/   model / ema / discriminator .safetensors, optimizer / disc_optimizer .pt
                                  (tensors only, loaded with weights_only=True), rng-rank<r>.json (every
                                  rank's Python, NumPy, torch and CUDA generators), trainer.json (step, kind,
                                  world size, lr, time, config)

A save writes .step-N.tmp/ and renames it when every file is written and fsynced, so a directory named
step-N is complete; the newest `keep` are kept. A resume reads the newest checkpoint whose files are all
readable, saying which newer ones it skipped and why. (checkpoint.py is the models' own save_pretrained
format and the atomic writes used here.)
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import (CheckpointError, atomic_save_safetensors, atomic_write_bytes, check_state_dict,
                         load_safetensors, read_json)
from .images import one_line

# ----------------------------------------------------------------------------------------------------------
# RNG streams: saved per rank, so a resumed run draws the same numbers as an uninterrupted one.


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *[v.item() if hasattr(v, "item") else v for v in np_state[2:]]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


@contextlib.contextmanager
def preserved_rng():
    """Previews and exports must not perturb the training RNG streams (resume reproducibility)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint files.

_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory appears under its final name only when complete)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_torch_tensors(obj: dict, path: Path) -> None:
    """torch.save for optimizer state only (nested dicts of tensors and numbers: weights_only-loadable),
    written atomically and fsynced like every other checkpoint file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch_tensors(path: Path, device) -> dict:
    """An optimizer state saved by save_torch_tensors; a one-line CheckpointError when it is unreadable."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        # torch has no restore rule for 'cpu:0', the device of a multi-process CPU (gloo) run: map to 'cpu'
        device = "cpu" if torch.device(device).type == "cpu" else device
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a pickle with objects: never a traceback
        raise CheckpointError(f"{path} is not a readable optimizer state ({one_line(e, 160)})") from None


def read_checkpoint(ckpt: Path, kind: str, with_disc: bool, device) -> dict:
    """Every file a resume needs, read once: {"step", "model", "ema", "optimizer"} and, with a discriminator
    whose files are there, "discriminator" / "disc_optimizer". A one-line CheckpointError names the first
    bad file."""
    meta = read_json(ckpt / "trainer.json")
    if meta.get("kind") != kind:
        raise CheckpointError(f"{ckpt} is a kind: {meta.get('kind')} checkpoint, the config says kind: {kind}")
    if not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{ckpt / 'trainer.json'} has no integer step")
    state = {"step": meta["step"], "model": load_safetensors(ckpt / "model.safetensors"),
             "ema": load_safetensors(ckpt / "ema.safetensors"),
             "optimizer": load_torch_tensors(ckpt / "optimizer.pt", device)}
    if with_disc and (ckpt / "discriminator.safetensors").exists():
        state["discriminator"] = load_safetensors(ckpt / "discriminator.safetensors")
    if with_disc and (ckpt / "disc_optimizer.pt").exists():
        state["disc_optimizer"] = load_torch_tensors(ckpt / "disc_optimizer.pt", device)
    return state


def newest_readable_checkpoint(checkpoints: list[Path], kind: str, with_disc: bool, device,
                               say: bool) -> tuple[Path, dict]:
    """The newest checkpoint read_checkpoint accepts, and its contents; says which newer ones it skipped."""
    reasons = []
    for ckpt in reversed(checkpoints):
        try:
            return ckpt, read_checkpoint(ckpt, kind, with_disc, device)
        except CheckpointError as e:
            reasons.append(str(e))
            if say:
                print(f"infgen train: skipping checkpoint {ckpt.name}: {e}", file=sys.stderr)
    raise CheckpointError(f"no readable checkpoint among {len(checkpoints)} in {checkpoints[0].parent} "
                          f"(newest: {reasons[0]})")


def load_weights(module: nn.Module, state: dict, source: str) -> None:
    check_state_dict(module.state_dict(), state, source)
    module.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------------
# Save, resume, prune.


@dataclass
class Resumed:
    """The checkpoint a run continues from: its step and its states as read_checkpoint returned them."""
    path: Path
    step: int
    states: dict

    def load(self, targets: dict[str, nn.Module | torch.optim.Optimizer | None]) -> None:
        """Load the saved state of each named module (strictly; before DDP wraps it) or optimizer (after
        accelerate prepared it). A target that is None or has no saved state is left alone; a loaded state
        is dropped here, since it now lives in its target."""
        for name, target in targets.items():
            if target is None or name not in self.states:
                continue
            if isinstance(target, torch.optim.Optimizer):
                target.load_state_dict(self.states.pop(name))
            else:
                load_weights(target, self.states.pop(name), str(self.path / f"{name}.safetensors"))


def seed_streams(seed: int, rank: int, resumed: Resumed | None) -> None:
    """This rank's training RNG streams: as its checkpoint saved them, else fresh but deterministic in
    (seed, rank, step): a new run, or a run resumed on a different number of processes."""
    rng_file = resumed.path / f"rng-rank{rank}.json" if resumed is not None else None
    if rng_file is not None and rng_file.is_file():
        set_rng_state(read_json(rng_file))
    else:
        seed_all(seed * 7919 + rank * 104729 + (resumed.step if resumed is not None else 0))


class Checkpointer:
    """The checkpoints of one run under `root`. Every rank holds one: a save is collective (each rank
    writes its RNG state, rank 0 everything else), so every rank must call save at the same steps."""

    def __init__(self, root: Path, accelerator, keep: int):
        self.root, self.accelerator, self.keep = Path(root), accelerator, keep
        self.is_main = accelerator.is_main_process
        self.found = list_checkpoints(self.root)                               # complete ones, at the start

    def begin(self, resume: bool) -> None:
        """Refuse to run over an earlier run's checkpoints unless resuming; clear what a killed save left."""
        if self.found and not resume:
            raise ValueError(f"{self.root.parent} already holds checkpoints (newest {self.found[-1].name}); pass "
                             "--resume to continue that run, or choose another --output")
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".step-*"):                            # left by a killed save
                shutil.rmtree(stale, ignore_errors=True)

    def newest(self, kind: str, with_disc: bool, device) -> Resumed | None:
        """The newest readable checkpoint (see read_checkpoint), None (said) when the run has none."""
        if not self.found:
            if self.is_main:
                print(f"infgen train: no checkpoint in {self.root}; starting from scratch", file=sys.stderr)
            return None
        path, states = newest_readable_checkpoint(self.found, kind, with_disc, device, self.is_main)
        return Resumed(path, states.pop("step"), states)

    def save(self, step: int, states: dict[str, nn.Module | torch.optim.Optimizer | None], meta: dict) -> bool:
        """Checkpoint `step`: each named module as NAME.safetensors, each optimizer as NAME.pt (None: skipped),
        `meta` as trainer.json; then keep the newest `keep`. False when this step is saved already."""
        final, tmp = self.root / f"step-{step:09d}", self.root / f".step-{step:09d}.tmp"
        if final.exists():
            return False
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        atomic_write_bytes(tmp / f"rng-rank{self.accelerator.process_index}.json", json.dumps(rng_state()).encode())
        if self.is_main:
            for name, source in states.items():
                if isinstance(source, torch.optim.Optimizer):
                    save_torch_tensors(source.state_dict(), tmp / f"{name}.pt")
                elif source is not None:
                    atomic_save_safetensors(source.state_dict(), tmp / f"{name}.safetensors")
            atomic_write_bytes(tmp / "trainer.json", json.dumps(meta, indent=2).encode())
        self.accelerator.wait_for_everyone()
        if self.is_main:
            os.replace(tmp, final)                                             # atomic: complete or absent
            for old in list_checkpoints(self.root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        return True
