"""One checkpoint file per save: G, D, both optimizers, both LR schedules, the grad scaler, step/epoch, the
config and the RNG states. Loading uses `torch.load(weights_only=True)`, so a checkpoint can never run
code; everything stored is tensors and plain Python values for that reason."""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from pix2pix.config import Pix2PixConfig
from pix2pix.training import TrainingStep

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    # RNG states are CPU tensors whatever device they seed; `load_checkpoint(map_location="cuda")` moves
    # them to the GPU with everything else, where the setters refuse them (and numpy cannot read them).
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def checkpoint_state(step: TrainingStep, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, **step.state_dict(), "rng": rng_state(), "extra": extra or {}}


def save_checkpoint(
    target: str | os.PathLike[str] | IO[bytes], step: TrainingStep, extra: dict[str, Any] | None = None
) -> None:
    """Write the checkpoint to a path (atomically: a reader never sees half a file) or a binary stream."""
    state = checkpoint_state(step, extra)
    if not isinstance(target, str | os.PathLike):
        torch.save(state, target)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(
    source: str | os.PathLike[str] | IO[bytes] | bytes, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    # Errors name a file given by path; for bytes or a stream the caller knows where they came from.
    where = f"{os.fspath(source)}: " if isinstance(source, str | os.PathLike) else ""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # a file that is not there or cannot be read: its own message says so
    except Exception as exc:  # torch.load's answers to garbage: KeyError, UnpicklingError, EINVAL, ...
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{where}not a pix2pix checkpoint, or a damaged one ({detail})") from exc
    if not isinstance(state, dict) or "format_version" not in state:
        raise ValueError(f"{where}not a pix2pix checkpoint (no format_version)")
    if state["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint format {state['format_version']} is newer than this library ({FORMAT_VERSION})"
        )
    return state


def restore_training_step(
    state: dict[str, Any],
    device: str | torch.device = "cpu",
    config: Pix2PixConfig | None = None,
    restore_rng: bool = True,
    **step_kwargs: Any,
) -> TrainingStep:
    """Rebuild a TrainingStep exactly where the checkpoint left it. Execution options (precision, compile,
    channels_last) may be changed through `config`; architecture fields must match the checkpoint."""
    config = config or Pix2PixConfig.from_dict(state["config"])
    step = TrainingStep(config, device, **step_kwargs)
    step.load_state_dict(state)
    if restore_rng:
        set_rng_state(state["rng"])
    return step
