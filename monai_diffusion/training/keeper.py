"""The checkpoints of a training run: ``last`` (confirmed), ``best`` and rotated ``step`` checkpoints.

``last.pt`` names only a state whose weights were seen to compute finite values: finite weights and
optimiser state are not enough (a huge learning rate gives finite weights of 1e30 whose next forward pass
is NaN). A ``step`` or ``last`` checkpoint is written at once, hidden as unconfirmed, and named by
``last.pt`` once confirmed: by the next optimiser step (finite losses, gradients and weights) or by a finite
validation of those weights. A run stopped in between never names it (``runner.py`` deletes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai_diffusion.runs.checkpoints import checkpoint_path, confirm_checkpoint, save_checkpoint, unconfirmed_path
from monai_diffusion.runtime import Precision, Runtime, capture_rng

__all__ = ["CheckpointKeeper"]


class CheckpointKeeper:
    """Writes a run's checkpoints (rank 0 alone) and confirms them.

    Args:
        run_dir: the run folder (``checkpoints/`` inside it).
        runtime: the process's place (every rank's random streams are gathered into each checkpoint).
        precision: its grad scaler is saved.
        keep_last: how many confirmed ``last``/``step`` checkpoints to keep.
    """

    def __init__(self, run_dir: Path, runtime: Runtime, precision: Precision, keep_last: int) -> None:
        self.run_dir, self.runtime, self.precision, self.keep_last = run_dir, runtime, precision, keep_last
        self.unconfirmed: list[Path] = []

    def confirm(self) -> None:
        """The unconfirmed checkpoints' weights computed finite values: ``last.pt`` names the newest."""
        for path in self.unconfirmed:  # in order (an older one is a predecessor of the state confirmed)
            confirm_checkpoint(path, self.keep_last)
        self.unconfirmed.clear()

    def save(self, name: str, task_state: dict[str, Any], loop_state: dict[str, Any], confirmed: bool = False) -> None:
        """Write checkpoint ``name`` (every rank calls it; rank 0 writes).

        Args:
            name: ``last``, ``best`` (after a finite validation), or ``step`` (a rotated step checkpoint that
                ``last`` then points to).
            task_state: the task's ``state_dict()``.
            loop_state: the loop's position (``vars(LoopState)``).
            confirmed: the weights were just validated, finite.
        """
        rng = self.runtime.all_gather(capture_rng(self.runtime.device))  # every rank's streams, restored per rank
        if self.runtime.is_main:
            payload = {**task_state, "loop": loop_state, "rng": rng, "scaler": self.precision.scaler.state_dict()}
            if name == "best":
                save_checkpoint(payload, checkpoint_path(self.run_dir, name))
            else:
                label = f"step_{loop_state['global_step']:08d}" if name == "step" else "last"
                self.unconfirmed.append(save_checkpoint(payload, unconfirmed_path(self.run_dir, label)))
                if confirmed:
                    self.confirm()
        self.runtime.barrier()
