"""Safe, strict checkpoint I/O: config.json + safetensors, never unpickling.

A checkpoint directory is self-describing: `config.json` says what to build, `model.safetensors` holds
the tensors. Loading is strict and reports every missing, unexpected or misshaped tensor by name.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # raw pickle protocol 2+, or torch.save's zip container


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message says which file and what was expected."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data does (power loss, SIGKILL'd VM)
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "r+b") as f:
            _sort_header(f)
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sort_header(f) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, in place: safetensors writes the metadata
    from a hash map, so the same tensors saved twice could differ in bytes (and git would store a bundle's
    unchanged codec again). Same content, same compact form, so never longer; padded with spaces as the
    format allows. The tensors' offsets count from the header's end, so they stay valid."""
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) <= n:
        f.seek(8)
        f.write(text.ljust(n))


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; a checkpoint directory needs {path.name}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a .safetensors file; refuse pickles and anything else with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; expected a .safetensors weights file")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then the JSON header's "{"
    if head[8:9] != b"{" and head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{path} looks like a pickle / torch.save file; infgen never unpickles "
                              "weights. Convert it to safetensors (safetensors.torch.save_file).")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None


def check_state_dict(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], source: str) -> None:
    """Strict comparison of key sets and shapes; one error listing every problem."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(got[k].shape)}"
                 for k in sorted(set(expected) & set(got)) if expected[k].shape != got[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if misshaped:
        problems.append(f"misshaped tensors {misshaped[:8]}{' ...' if len(misshaped) > 8 else ''}")
    if problems:
        raise CheckpointError(f"{source} does not match the model built from its config: " + "; ".join(problems))


def save_module(module: torch.nn.Module, class_name: str, config: dict, path: str | Path) -> None:
    """Write `path/config.json` ({"_class_name": ..., **config}) and `path/model.safetensors`, atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(module.state_dict(), path / WEIGHTS_NAME, metadata={"format": "pt", "class": class_name})
    text = json.dumps({"_class_name": class_name, **config}, indent=2, sort_keys=True)
    atomic_write_bytes(path / CONFIG_NAME, text.encode())


def load_module(path: str | Path, class_name: str, build: Callable[[dict], torch.nn.Module],
                device: str | torch.device = "cpu", default_class: str | None = None) -> torch.nn.Module:
    """Strictly load what `save_module` wrote. `build(config_dict)` makes the empty module; config errors
    (unknown keys, bad values), a different class, and missing/extra/misshaped tensors are CheckpointErrors."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    raw = read_json(path / CONFIG_NAME)
    name = raw.pop("_class_name", default_class)
    if name != class_name:
        raise CheckpointError(f"{path} holds a {name or 'unknown'} checkpoint, expected {class_name}")
    try:
        module = build(raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from None
    state = load_safetensors(path / WEIGHTS_NAME)
    check_state_dict(module.state_dict(), state, str(path / WEIGHTS_NAME))
    module.load_state_dict(state, strict=True)
    return module.to(device).eval()
