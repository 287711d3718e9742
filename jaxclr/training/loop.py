"""The one training loop: every job that trains something runs through `run`.

Pretraining, fine-tuning and the paper's linear probe (and later other
methods and distillation) each supply a `Job`: how to create a fresh state,
the jitted step, the batches from a given step on, and its cadence. The loop
does everything else, in one place for all of them: restore-or-init from the
job's checkpoints, prefetch to devices, compile together across processes,
log / evaluate / checkpoint at their intervals, SIGTERM and preemption
notices, the non-finite policy, and the final save.

The host synchronises with the devices only at log and checkpoint steps
(metrics and the skipped-update count); every other step just enqueues work.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import signal
import threading
from typing import Any, Callable, Iterator

import jax
from absl import logging

from jaxclr import errors
from jaxclr.parallel import distributed, sharding
from jaxclr.training import checkpoint, optim, workdir as workdir_lib
from jaxclr.training.metrics import MetricsLogger

NONFINITE_POLICIES = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class Cadence:
  """How often the loop logs and saves, and what a non-finite update does.

  nonfinite_policy: 'stop' raises NonFiniteError at the first log or
  checkpoint step after an update with a non-finite gradient, without
  saving; 'skip' goes on (each such update is skipped: training/state.py).
  """
  log_every_steps: int
  checkpoint_every_steps: int
  max_checkpoints_to_keep: int
  nonfinite_policy: str = "stop"

  @classmethod
  def from_config(cls, config) -> "Cadence":
    return cls(log_every_steps=config.log_every_steps,
               checkpoint_every_steps=config.checkpoint_every_steps,
               max_checkpoints_to_keep=config.max_checkpoints_to_keep,
               nonfinite_policy=config.nonfinite_policy)


@dataclasses.dataclass(frozen=True)
class Job:
  """What a training job supplies to the loop.

  init_state: jitted (*init_args) -> a fresh state (a TrainState), with
    out_shardings: those shardings are also where a restored state is
    placed. init_args: its arguments (an rng, restored variables).
  step: jitted (state, global batch, *step_args) -> (state, metrics);
    donates the state. step_args: device arrays the step reads but never
    changes (a frozen encoder's variables), passed as arguments rather than
    closed over, so that they are not baked into the program as constants.
  batches: start_step -> process-local numpy batches (dicts) from that step
    on; each becomes a global batch sharded over the mesh's data axis. Only
    opened when there is a step left to run.
  evaluate: (step, state) -> metrics dict or None, after every step (the
    job decides when to do work); its time is left out of throughput.
  meta: JSON-serialisable facts saved with every checkpoint.
  preview: process-local first batch -> {summary name: images [N, H, W, C]
    in [0, 1]}, written to TensorBoard at the start step by the primary
    process: the very pixels the first step trains on.
  """
  name: str
  init_state: Callable[..., Any]
  step: Callable[[Any, dict], tuple[Any, dict]]
  batches: Callable[[int], Iterator[dict]]
  total_steps: int
  steps_per_epoch: int
  batch_size: int
  init_args: tuple = ()
  step_args: tuple = ()
  evaluate: Callable[[int, Any], dict | None] | None = None
  meta: dict = dataclasses.field(default_factory=dict)
  preview: Callable[[dict], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Result:
  state: Any
  start_step: int  # Where this run started: 0, or the step it resumed.
  last_logged: dict  # The last metrics record written ({} if none).


class PreemptionFlag:
  """Set by SIGTERM in single-process runs; the loop acts on it after the
  step it is in (Python runs signal handlers between bytecodes, so a handler
  caught while the main thread waits in XLA runs when that call returns).

  Across processes the handler is not installed: jax.distributed's own
  SIGTERM notifier feeds JAX's preemption sync point, which Orbax's
  reached_preemption reads, so every host stops and saves at the same step.
  Replacing that handler with a Python one would hide the notice.
  """

  def __init__(self, install: bool | None = None):
    self.event = threading.Event()
    self._previous = None
    if install is None:
      install = jax.process_count() == 1
    if install and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step "
                    "and exiting.")
    self.event.set()

  def reached(self, store: checkpoint.CheckpointStore, step: int) -> bool:
    """Whether to save at `step` and stop: this process's SIGTERM, or across
    processes JAX's preemption sync point (the same answer on every host,
    so all of them save the same step together)."""
    if jax.process_count() > 1:
      return store.reached_preemption(step)
    return self.event.is_set()

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def prefetch(iterator: Iterator[Any], size: int = 2) -> Iterator[Any]:
  """Runs `iterator` in a background thread, `size` items ahead."""
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()

  def worker():
    try:
      for item in iterator:
        q.put(item)
    except BaseException as e:  # Re-raised in the consumer.
      q.put(e)
    q.put(sentinel)

  threading.Thread(target=worker, daemon=True).start()
  while True:
    item = q.get()
    if item is sentinel:
      return
    if isinstance(item, BaseException):
      raise item
    yield item


class _NonFiniteGuard:
  """The host side of the non-finite policy, read at log/save steps only."""

  def __init__(self, policy: str, store: checkpoint.CheckpointStore):
    if policy not in NONFINITE_POLICIES:
      raise errors.ConfigError(f"nonfinite_policy={policy!r}; valid: "
                               f"{NONFINITE_POLICIES}")
    self.policy, self.store = policy, store
    self.reported, self.checked_at = 0, None
    self._count, self._read_at = 0, None

  def count(self, state, step: int) -> int:
    """Updates skipped so far: one device read per step at most."""
    if step != self._read_at:
      self._count = int(jax.device_get(optim.nonfinite_count(state.opt_state)))
      self._read_at = step
    return self._count

  def check(self, state, step: int) -> None:
    """NonFiniteError under 'stop' if an update was skipped since the last
    check; a warning under 'skip'."""
    count = self.count(state, step)
    if count == self.reported:
      self.checked_at = step
      return
    since = "the start" if self.checked_at is None else \
        f"step {self.checked_at}"
    self.checked_at = step
    if self.policy == "skip":
      logging.warning("Skipped %d update(s) with a non-finite gradient so "
                      "far (%d since %s).", count, count - self.reported,
                      since)
      self.reported = count
      return
    steps = self.store.all_steps()
    last_good = (self.store.path(steps[-1]) if steps else
                 "none (no checkpoint yet)")
    raise errors.NonFiniteError(
        f"non-finite gradient in {count - self.reported} update(s) between "
        f"{since} and step {step}; stopped without saving (last good "
        f"checkpoint: {last_good}). Lower the learning rate, or set "
        "--config.nonfinite_policy=skip to skip such updates")


def _restore_or_init(job: Job, store: checkpoint.CheckpointStore):
  restored = store.restore(
      checkpoint.abstract_state(job.init_state, *job.init_args))
  if restored is None:
    return job.init_state(*job.init_args), 0
  state, _, step = restored
  logging.info("Resumed from %s (%s).", store.path(step), job.name)
  return state, step


def run(job: Job, *, workdir: str, mesh, cadence: Cadence) -> Result:
  """Trains `job` in `workdir` (resuming from its newest valid checkpoint)
  to job.total_steps, saving the final state.

  Raises:
    errors.Preempted: after saving at the current step on SIGTERM or a
      preemption notice (the same command resumes).
    errors.SaveError: a checkpoint could not be written (the run stops at
      the step after the failure is known; earlier checkpoints are intact).
    errors.NonFiniteError: policy 'stop' and a non-finite gradient.
    errors.CheckpointError: checkpoints exist but none can be restored.
  """
  store = checkpoint.CheckpointStore(
      os.path.join(workdir, workdir_lib.CHECKPOINT_DIR),
      save_every_steps=cadence.checkpoint_every_steps,
      max_to_keep=cadence.max_checkpoints_to_keep)
  preemption = PreemptionFlag()
  try:
    state, start = _restore_or_init(job, store)
    if start >= job.total_steps:  # Finished before: nothing to train.
      result = Result(state, start, {})
    else:
      result = _train(job, state, start, store=store, workdir=workdir,
                      mesh=mesh, cadence=cadence, preemption=preemption)
  except BaseException:
    store.close(quiet=True)  # A failing save must not hide the error here.
    raise
  finally:
    preemption.restore()
  store.close()
  return result


def _train(job, state, start, *, store, workdir, mesh, cadence,
           preemption) -> Result:
  step_fn = job.step
  local_batches = job.batches(start)
  preview = {}
  if job.preview is not None and jax.process_index() == 0:
    first_local = next(local_batches)
    preview = job.preview(first_local)
    local_batches = itertools.chain([first_local], local_batches)
  batches = prefetch(sharding.global_batch(mesh, b) for b in local_batches)
  if jax.process_count() > 1:
    # Compile, then start together: see distributed.compile_together.
    first = next(batches)
    step_fn = distributed.compile_together(step_fn, state, first,
                                           *job.step_args)
    batches = itertools.chain([first], batches)
  guard = _NonFiniteGuard(cadence.nonfinite_policy, store)
  logger = MetricsLogger(workdir, is_primary=jax.process_index() == 0,
                         total_steps=job.total_steps,
                         batch_size=job.batch_size, start_step=start)
  if preview:
    logger.write_images(start, preview)
  last_logged: dict = {}
  try:
    for step in range(start, job.total_steps):
      state, metrics = step_fn(state, next(batches), *job.step_args)
      done = step + 1
      # A failed asynchronous save stops the run now, not at the next save.
      store.raise_if_save_failed(at_step=done)
      last = done == job.total_steps
      if step == start:
        logger.reset_timer(done)  # Exclude compilation from throughput.
      if done % cadence.log_every_steps == 0 or last:
        skipped = guard.count(state, done)
        last_logged = logger.log_train(  # The bad step's record, too.
            done, {**jax.device_get(metrics),
                   "epoch": done / job.steps_per_epoch,
                   **({"skipped_updates": skipped} if skipped else {})})
        guard.check(state, done)
      if job.evaluate is not None:
        eval_metrics = job.evaluate(done, state)
        if eval_metrics:
          logger.log_scalars(done, eval_metrics)
          logger.reset_timer(done)  # Exclude evaluation from throughput.
      preempted = preemption.reached(store, done)
      if done % cadence.checkpoint_every_steps == 0 or last or preempted:
        guard.check(state, done)  # Never save past a refused update ('stop').
        store.save(done, state, {**job.meta, "step": done}, force=True)
      if preempted:
        store.wait_until_finished(at_step=done)  # Committed, or SaveError.
        logging.warning("Preempted: saved step %d to %s; re-run the same "
                        "command to resume.", done, store.path(done))
        raise errors.Preempted(done, store.path(done))
    store.wait_until_finished(at_step=job.total_steps)
  finally:
    logger.close()
  return Result(state, start, last_logged)
