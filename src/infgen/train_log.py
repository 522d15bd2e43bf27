"""What a training run says about itself: metrics.jsonl (one JSON object per log line: the step's losses,
lr, seconds per part of the step, data statistics; the val_psnr lines), TensorBoard when it is installed,
and the progress bar."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from .checkpoint import atomic_write_bytes
from .train_config import TrainConfig


class StepTimer:
    """Seconds per part of a training step (data, codec, model, loss_nets, optimizer), summed until reset.
    On a GPU every lap synchronises, so the parts are real (and the step a little slower)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.sums: dict[str, float] = {}
        self.t = 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()                                           # note: sync point
        return time.perf_counter()

    def start(self) -> None:
        self.t = self._now()

    def lap(self, part: str) -> None:
        now = self._now()
        self.sums[part] = self.sums.get(part, 0.0) + now - self.t
        self.t = now

    def reset(self) -> None:
        self.sums = {}


def _stats_dict(stats) -> dict:
    if stats is None:
        return {}
    if isinstance(stats, dict):
        return dict(stats)
    if hasattr(stats, "as_dict"):
        return stats.as_dict()
    return {k: v for k, v in vars(stats).items() if not k.startswith("_")} if hasattr(stats, "__dict__") else {"stats": str(stats)}


class RunLog:
    """Rank 0 writes metrics.jsonl, TensorBoard and the bar; every rank sums its steps' parts (device
    tensors: no cross-rank sync, and no device sync until a line is written) and resets on the same steps."""

    def __init__(self, cfg: TrainConfig, step: int, world: int, is_main: bool, timer: StepTimer,
                 perceptual_name: str | None):
        from tqdm.auto import tqdm
        out = Path(cfg.output)
        self.path, self.cfg, self.world, self.is_main, self.timer = out / "metrics.jsonl", cfg, world, is_main, timer
        self.perceptual_name = perceptual_name                                # the logged name of "perceptual"
        self.sums: dict[str, float] = {}
        self.count = 0
        self.writer = None
        if is_main:
            self._drop_lines_after(step)
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out / "tensorboard"))
        self.bar = tqdm(total=cfg.train.max_steps, initial=step, disable=not is_main, desc=f"train {cfg.kind}",
                        unit="step", dynamic_ncols=True)

    def _drop_lines_after(self, step: int) -> None:
        """A resumed run logs its steps again: drop the lines past the checkpoint (and one torn by a kill)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
        atomic_write_bytes(self.path, "".join(line + "\n" for line in keep).encode())

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def step(self, step: int, parts: dict, lr: float, batch: dict, loader) -> None:
        """Count finished step `step`: every train.log_every steps, and at the last, rank 0 writes the means."""
        self.bar.update(1)
        for name, value in parts.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1
        if self.is_main and (step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps):
            split = {f"t_{k}": v / self.count for k, v in self.timer.sums.items()}   # seconds per step
            record = self._record(step, lr, split, batch, loader)
            self.write(record)
            if self.writer is not None:
                for name, value in record.items():
                    if isinstance(value, float):
                        self.writer.add_scalar(f"train/{name}", value, step)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", l1=f"{record['l1']:.4f}", lr=f"{lr:.2e}",
                                 s="/".join(f"{v:.2f}" for v in split.values()), refresh=False)
            self._reset()
        elif not self.is_main and step % self.cfg.train.log_every == 0:
            self._reset()

    def _record(self, step: int, lr: float, split: dict, batch: dict, loader) -> dict:
        seconds = sum(split.values())
        record = {"step": step, **{k: float(v) / self.count for k, v in self.sums.items()}, "lr": lr,
                  "s_per_step": seconds, **split, "data_wait_s": split["t_data"], "it_s": 1.0 / seconds,
                  "images_per_s": self.cfg.data.batch_size * self.world / seconds,
                  "target_hw": list(batch["target"].shape[-2:]) if self.cfg.kind == "infgen" else None,
                  "data": _stats_dict(getattr(loader, "stats", None))}
        if self.perceptual_name is not None and "perceptual" in record:
            record[self.perceptual_name] = record.pop("perceptual")             # vgg19_feat, never 'lpips'
        return record

    def _reset(self) -> None:
        self.sums, self.count = {}, 0
        self.timer.reset()

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
