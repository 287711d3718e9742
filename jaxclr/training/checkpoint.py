"""Orbax checkpoints: async saves, restore-or-init, corruption fallback.

Orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames it only
once every process has finished, so an interrupted save never looks like a
checkpoint (such leftovers are reported and removed at start-up). With
max_to_keep, Orbax picks the steps to drop when a save starts but deletes
them in its finalize thread only after the new step is committed, so a crash
mid-save leaves max_to_keep + 1 checkpoints, never fewer valid ones.

A committed checkpoint whose files were later damaged is caught at restore:
TensorStore reports truncated files, and a per-leaf hash stored in the
"meta" item (computed on the devices, layout-independent) catches changed
bytes, which TensorStore does not. A damaged
checkpoint newer than the newest valid one is moved aside (never deleted) and
the valid one is used. When none can be restored (e.g. the model changed) no
checkpoint is touched and CheckpointError names the newest one's error.

A save that fails (disk full, an I/O error) raises SaveError as soon as the
loop looks, which is after every step (`raise_if_save_failed`, which does not
block) rather than at the next save, where Orbax would raise it: the run stops
a step or two after the write failed, not `checkpoint_every_steps` later.
Orbax deletes old checkpoints only after a save committed, so a failed save
leaves every earlier checkpoint in place; its temporary directory is removed
at the next start.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jaxclr import errors

CORRUPT_PREFIX = "corrupt_"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Named apart from the CRC-32 'fingerprint' of jaxclr <= 0.1 checkpoints.
FINGERPRINT_KEY = "state_hash"


CheckpointError = errors.CheckpointError
SaveError = errors.SaveError


# The errors a write meets, in the words of the OS (os.strerror), found in
# whatever exception carries them: TensorStore reports them inside a long
# ValueError, Python's own I/O as an OSError.
WRITE_ERRNOS = ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO", "EACCES",
                "EPERM", "ENOENT")


def _cause(error: BaseException, limit: int = 200) -> str:
  """'<OS error words>: <type>: <first line, shortened>' of a failed write;
  the OS's words lead because the first line of a TensorStore error is
  mostly the path of the file it was writing."""
  text = str(error).strip()
  head = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
  if len(head) > limit:
    head = head[:limit] + "..."
  words = [os.strerror(getattr(errno, name)) for name in WRITE_ERRNOS
           if hasattr(errno, name)]
  found = next((w for w in words if w in text), None)
  return f"{found}: {head}" if found else head


def _as_uint32(x):
  """The bits of each element of `x` as uint32 (widened when narrower)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = jnp.dtype(x.dtype).itemsize
  if width not in (1, 2, 4):
    raise ValueError(f"cannot fingerprint a {x.dtype} array (x64 is off)")
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_hash(x):
  """uint32 [2]: two position-weighted sums of the element bits, mod 2**32.

  Sums of integers do not depend on the order in which a sharded reduction
  adds them, so the hash is the same on any device or process layout (a
  state saved on 8 devices checks out when restored on 1), and no array is
  gathered onto one host. Each element is weighted by an odd number
  (invertible mod 2**32), so any single changed element changes both sums.
  """
  bits = _as_uint32(jnp.asarray(x))
  index = jnp.zeros(bits.shape, jnp.uint32)
  for axis in range(bits.ndim):  # The row-major position of each element.
    stride = int(np.prod(bits.shape[axis + 1:]))
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape,
                                             axis) * jnp.uint32(stride)
  odd = index * jnp.uint32(2) + jnp.uint32(1)
  mixed = (bits ^ (index * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B)
  return jnp.stack([jnp.sum(bits * odd, dtype=jnp.uint32),
                    jnp.sum(mixed * odd, dtype=jnp.uint32)])


@jax.jit
def _tree_hash(tree):
  return jax.tree.map(_leaf_hash, tree)


def fingerprint(state) -> dict[str, list[int]]:
  """{leaf path: [h1, h2]} of a pytree of (possibly sharded) arrays.

  Computed on the devices where the state lives (one small compiled
  program per state structure); only 8 bytes per leaf reach the host.
  """
  hashes = jax.device_get(_tree_hash(state))
  flat = jax.tree_util.tree_flatten_with_path(hashes)[0]
  return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(h)]
          for path, h in flat}


def abstract_state(init_state, *args):
  """Shapes, dtypes and shardings of the state `init_state(*args)` creates.

  `init_state` is jitted with out_shardings: that one place decides where
  each array lives, for a fresh state and for a restored one alike.
  """
  abstract = jax.eval_shape(init_state, *args)
  unplaced = [jax.tree_util.keystr(path) for path, leaf in
              jax.tree_util.tree_leaves_with_path(abstract)
              if getattr(leaf, "sharding", None) is None]
  if unplaced:
    raise ValueError(f"init_state must be jitted with out_shardings; "
                     f"{unplaced[0]} has no sharding")
  return abstract


class CheckpointStore:
  """Saves and restores TrainState pytrees under `directory/<step>/`."""

  def __init__(self, directory, *, save_every_steps: int = 1,
               max_to_keep: int | None = None, async_save: bool = True,
               read_only: bool = False):
    # Orbax needs absolute paths (a relative one fails inside its background
    # commit, after training has moved on); cloud URLs are left as they are.
    directory = os.fspath(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    if read_only:  # Another job's checkpoints (an encoder to evaluate).
      options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    else:
      self.report_incomplete_saves()
      options = ocp.CheckpointManagerOptions(
          save_interval_steps=max(1, save_every_steps),
          max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
          create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))
    self._pending = None  # The step of the save in flight, if any.

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def path(self, step: int) -> str:
    return os.fspath(self.directory / str(step))

  def restore(self, abstract_state, step: int | None = None):
    """Restores `step` (default: the newest valid one).

    Returns (state, meta, step) or None when there is no checkpoint. Damaged
    checkpoints newer than the newest valid one are reported by path, moved
    aside and skipped; an explicitly requested step that fails raises.

    Raises:
      CheckpointError: checkpoints exist but none can be restored (nothing
        is moved aside then: the cause is more likely a changed model).
    """
    if step is not None:
      return self._restore_step(abstract_state, step) + (step,)
    damaged = []
    for candidate in reversed(self.all_steps()):
      try:
        state, meta = self._restore_step(abstract_state, candidate)
      except Exception as e:  # Orbax raises many types for damaged files.
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        logging.warning("Checkpoint %s cannot be restored (%s); trying the "
                        "previous one.", self.path(candidate), reason)
        damaged.append((candidate, reason))
        continue
      for bad, _ in damaged:
        self._move_aside(bad)
      if damaged:
        logging.warning("Resuming from %s, the newest valid checkpoint.",
                        self.path(candidate))
      return state, meta, candidate
    if damaged:
      raise CheckpointError(
          f"No checkpoint in {os.fspath(self.directory)} can be restored "
          f"(newest {self.path(damaged[0][0])}: {damaged[0][1]}); if the "
          "model or optimizer changed, use a new --workdir")
    return None

  def _restore_step(self, abstract_state, step: int):
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    expected = (restored.meta or {}).get(FINGERPRINT_KEY)
    if expected is not None:
      actual = fingerprint(restored.state)
      bad = sorted(k for k in set(expected) | set(actual)
                   if expected.get(k) != actual.get(k))
      if bad:
        raise ValueError(f"contents differ from what was saved in "
                         f"{len(bad)} array(s), first {bad[0]}")
    return restored.state, restored.meta

  def restore_subtree(self, step: int, item):
    """The leaves of the saved state that `item` (a pytree of
    ShapeDtypeStructs with shardings, a subset of the state) names.

    Leaves that the checkpoint lacks come back as the ShapeDtypeStructs
    they were asked as; callers check for them.
    """
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                     partial_restore=True)))
    return restored.state

  def restore_meta(self, step: int) -> dict:
    """The JSON facts saved with `step` (dataset, num_classes, ...)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return dict(restored.meta or {})

  def report_incomplete_saves(self) -> list[str]:
    """Warns about saves that never committed (Orbax removes them)."""
    if not self.directory.exists():
      return []
    found = sorted(os.fspath(p) for p in self.directory.iterdir()
                   if TMP_SUFFIX in p.name)
    for path in found:
      logging.warning("Incomplete checkpoint %s (a save that was interrupted)"
                      " is ignored.", path)
    return found

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
    """Starts an (async) save; with force, saves regardless of the interval.

    The state's fingerprint goes into the meta item, for restore to check.

    Raises:
      SaveError: this save could not start, or the previous one failed.
    """
    self.wait_until_finished(at_step=step)  # Orbax would wait for it anyway.
    meta = {**meta, FINGERPRINT_KEY: fingerprint(state)}
    try:
      saved = self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
          force=force)
    except Exception as e:  # The synchronous part: directories, copies.
      raise self._save_error(step, e, at_step=step) from e
    if saved:
      self._pending = step
    return saved

  def raise_if_save_failed(self, at_step: int) -> None:
    """SaveError if the save in flight has finished and failed; returns at
    once while it is still running (no device or disk access)."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.wait_until_finished(at_step=at_step)

  def wait_until_finished(self, at_step: int | None = None) -> None:
    """Blocks until the save in flight is committed.

    Raises:
      SaveError: it failed (naming its step, the cause, and the newest
        checkpoint that is committed).
    """
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # Whatever the writer raised (OSError, ValueError).
      step, self._pending = self._pending, None
      raise self._save_error(step, e, at_step=at_step) from e
    self._pending = None

  def _committed_steps(self) -> list[int]:
    if "://" in os.fspath(self.directory):
      self.manager.reload()
      return self.all_steps()
    return sorted(int(p.name) for p in self.directory.iterdir()
                  if p.name.isdigit())

  def _save_error(self, step, error: BaseException, *,
                  at_step: int | None) -> SaveError:
    try:
      committed = self._committed_steps()
    except OSError:
      committed = []
    newest = (f"the newest, {self.path(committed[-1])}, is intact"
              if committed else "there is none yet")
    stopped = "" if at_step is None else f"; stopped at step {at_step}"
    what = f"checkpoint {step}" if step is not None else "a checkpoint"
    return SaveError(
        f"could not save {what} in {os.fspath(self.directory)} "
        f"({_cause(error)}){stopped}. Committed checkpoints are "
        f"untouched ({newest}): fix the cause (free space?) and re-run the "
        "same command to resume from the newest")

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self, *, quiet: bool = False):
    """Waits for the save in flight and closes; quiet: log a failure of that
    save instead of raising it (an error is already on its way out)."""
    try:
      self.wait_until_finished()
    except SaveError as e:
      if not quiet:
        raise
      logging.error("%s", e)
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    self.close(quiet=exc_type is not None)
