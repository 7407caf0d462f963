"""Checkpoints of a run, written atomically so that a resumed run ends bit-identical to an
uninterrupted one.

``output_dir/checkpoints/step-NNNNNN/`` holds:

- ``trainable.safetensors``: every trainable tensor (the LoRA adapter, or all weights);
- ``optimizer.pt``: the optimizer's state dict (read back with ``weights_only=True``);
- ``rng.safetensors``: the torch RNG states (CPU and each CUDA device) of every process, as
  ``rank<r>/cpu``, ``rank<r>/cuda:<i>``: dropout's randomness;
- ``state.json``: the step, the scheduler's state and the NGDiff step counter.

The data position is the step itself (:class:`~unlearn_kernels.data.unlearn.StepSampler`); the
GeN learning rate and the NGDiff step counter live in the optimizer's parameter groups. A
directory appears under its final name only when complete; older checkpoints beyond ``keep`` are
then removed. Under data parallelism every process calls :func:`save_checkpoint` (their RNG
states are gathered) and rank 0 writes; every process loads.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor

from unlearn_kernels._io import write_dir_atomically
from unlearn_kernels.train import distributed

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{6,})$")


def _rng_states() -> dict[str, Tensor]:
    """This process's RNG states, and under data parallelism every process's (gathered)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            states[f"cuda:{index}"] = torch.cuda.get_rng_state(index)
    if not distributed.active():
        return {f"rank0/{name}": state for name, state in states.items()}
    device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else torch.device("cpu")
    gathered = {}
    for name, state in states.items():  # same names and sizes on every process
        parts = [torch.empty_like(state, device=device) for _ in range(distributed.world_size())]
        dist.all_gather(parts, state.to(device))
        gathered.update({f"rank{r}/{name}": part.cpu() for r, part in enumerate(parts)})
    return gathered


def _nccl() -> bool:
    return dist.get_backend() == "nccl"


def _set_rng_states(states: dict[str, Tensor], path: Path) -> None:
    prefix = f"rank{distributed.rank()}/"
    mine = {k.removeprefix(prefix): v for k, v in states.items() if k.startswith(prefix)}
    if not mine:
        ranks = sorted({k.split("/")[0] for k in states})
        raise ValueError(
            f"checkpoint {path} holds the RNG states of {', '.join(ranks)}, not of this process "
            f"({prefix.rstrip('/')}): resume with the number of processes that wrote it"
        )
    for name, state in mine.items():
        if name == "cpu":
            torch.set_rng_state(state)
        else:
            torch.cuda.set_rng_state(state, int(name.split(":")[1]))


def save_checkpoint(
    output_dir: Path,
    step: int,
    trainable: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` and keep only the newest ``keep`` checkpoints."""
    root = output_dir / CHECKPOINTS
    path = root / f"step-{step:06d}"
    rng = _rng_states()

    def fill(tmp: Path) -> None:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in trainable.items()},
            str(tmp / "trainable.safetensors"),
        )
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))

    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        write_dir_atomically(path, fill)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    distributed.barrier()
    return path


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory was written after."""
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def load_checkpoint(
    path: Path, trainable: dict[str, Tensor], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore the trainable tensors, the optimizer and the RNG states; return ``state.json``."""
    tensors = load_file(str(path / "trainable.safetensors"))
    if set(tensors) != set(trainable):
        raise ValueError(
            f"checkpoint {path} holds other trainable tensors than this run's model "
            f"({len(tensors)} vs {len(trainable)}): it was written by a different config"
        )
    with torch.no_grad():
        for name, tensor in trainable.items():
            tensor.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    _set_rng_states(load_file(str(path / "rng.safetensors")), path)
    return json.loads((path / "state.json").read_text())
