"""Orbax checkpoints: async saves, restore-or-init, corruption fallback.

Orbax writes each step to a temporary directory and renames it only once
every process has finished, so an interrupted save never looks like a
checkpoint. A finalised checkpoint whose files were later damaged is caught at
restore: it is moved aside (never deleted) and the next newest one is used.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

CORRUPT_PREFIX = "corrupt_"


class CheckpointStore:
  """Saves and restores TrainState pytrees under `directory/<step>/`."""

  def __init__(self, directory, *, save_every_steps: int, max_to_keep: int,
               async_save: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, save_every_steps), max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state, step: int | None = None):
    """Restores `step` (default: the newest valid one).

    Returns (state, meta, step) or None when there is no checkpoint. A latest
    checkpoint that fails to restore is reported, moved aside and skipped; an
    explicitly requested step that fails raises.
    """
    if step is not None:
      return self._restore_step(abstract_state, step) + (step,)
    for candidate in reversed(self.all_steps()):
      try:
        state, meta = self._restore_step(abstract_state, candidate)
        return state, meta, candidate
      except Exception as e:  # Orbax raises many types for damaged files.
        path = self.directory / str(candidate)
        logging.warning("Checkpoint %s is unreadable (%s: %s); falling back "
                        "to the previous one.", path, type(e).__name__,
                        str(e).splitlines()[0][:300])
        self._move_aside(candidate)
    return None

  def _restore_step(self, abstract_state, step: int):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def _move_aside(self, step: int):
    """Renames a damaged checkpoint so later saves of that step can proceed."""
    if jax.process_index() == 0:
      src = os.fspath(self.directory / str(step))
      dst = os.fspath(self.directory /
                      f"{CORRUPT_PREFIX}{step}_{int(time.time())}")
      os.replace(src, dst)
      logging.warning("Moved damaged checkpoint %s to %s (kept, not deleted).",
                      src, dst)
    multihost_utils.sync_global_devices(f"jaxclr_move_aside_{step}")
    self.manager.reload()

  def save(self, step: int, state, meta: dict[str, Any], *,
           force: bool = False) -> bool:
    """Starts an (async) save; with force, saves regardless of the interval."""
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        force=force)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait_until_finished(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
