"""Orbax checkpoints of a training state (arrays) plus JSON metadata (step, loss history).

Only finite states are ever saved (the trainer checks before saving), and the manager keeps the two most
recent, so after a crash or a NaN the latest checkpoint is always a good one to resume from.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class TrainCheckpoints:
    """Save / restore `(state pytree, metadata dict)` pairs under one directory, keyed by step."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """The state at `step` (latest by default) in the structure of `template`, and its metadata."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{self.directory}: no checkpoint to restore")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
        return step, out["state"], dict(out["meta"])

    def close(self) -> None:
        self._manager.close()
