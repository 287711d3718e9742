"""The pretraining job: restore-or-init, the step loop, checkpoints, metrics.

Host synchronisation happens only at log and checkpoint steps (fetching
metrics and the non-finite flag); every other step just enqueues work.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import queue
import signal
import threading
from typing import Any, Callable, Iterator

import jax
from absl import logging

from jaxclr import checkpoint, config_lib, errors, optim, train, workdir as workdir_lib
from jaxclr.data import input_pipeline
from jaxclr.evaluation import periodic
from jaxclr.metrics import MetricsLogger
from jaxclr.models.simclr import build_model
from jaxclr.parallel import distributed, sharding


NonFiniteError, Preempted = errors.NonFiniteError, errors.Preempted


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

  def reached(self, store, step: int) -> bool:
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


def describe_run(config, plan: optim.TrainingPlan, mesh) -> str:
  n_proc = jax.process_count()
  n_dev = mesh.devices.size
  return (
      f"{sharding.describe_layout(mesh)}; global batch "
      f"{config.batch_size} images = {config.batch_size // n_proc} per process "
      f"= {config.batch_size // n_dev} per device (x2 views); "
      f"{plan.num_examples} examples, {plan.steps_per_epoch} steps/epoch, "
      f"{plan.total_steps} steps, warmup {plan.warmup_steps}; peak lr "
      f"{plan.peak_learning_rate:.4g} ({config.learning_rate} "
      f"{config.learning_rate_scaling}-scaled)")


def _nonfinite_metrics(which: int) -> str:
  names = [name for bit, name in ((train.NONFINITE_LOSS, "total_loss"),
                                  (train.NONFINITE_GRAD, "grad_norm"))
           if which & bit]
  return " and ".join(names) or "total_loss/grad_norm"


def _check_finite(state, policy: str, store, reported: int) -> int:
  """Raises NonFiniteError (policy 'stop') if any update was non-finite.

  With policy 'skip' it warns about newly skipped updates instead and returns
  how many have been skipped so far (pass it back as `reported`).
  Steps are numbered as in the logs: the update that produces step N.
  """
  first_bad, count, which = (int(x) for x in jax.device_get(state.nonfinite))
  if first_bad < 0:
    return 0
  step, metric = first_bad + 1, _nonfinite_metrics(which)
  if policy == "skip":
    if count > reported:
      logging.warning("Skipped %d update(s) with a non-finite loss or "
                      "gradient norm so far (the first at step %d: %s).",
                      count, step, metric)
    return count
  steps = store.all_steps()
  last_good = store.path(steps[-1]) if steps else "none (no checkpoint yet)"
  raise NonFiniteError(
      f"non-finite {metric} at step {step}; stopped without saving (last "
      f"good checkpoint: {last_good}). Lower the learning rate, or set "
      "--config.nonfinite_policy=skip to skip such updates")


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The compiled pieces of a pretraining run on one mesh."""
  model: Any
  tx: Any
  schedule: Any
  init_fn: Callable  # rng -> TrainState, replicated over the mesh.
  step_fn: Callable  # (state, global batch) -> (state, metrics); donates state.
  state_sharding: Any

  def abstract_state(self, rng):
    """Shapes, dtypes and shardings of the state, for restoring into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=self.state_sharding),
        jax.eval_shape(self.init_fn, rng))


def create_trainer(config, mesh, plan: optim.TrainingPlan,
                   num_classes: int) -> Trainer:
  """Model, LARS, schedule, and the jitted init and step for `mesh`."""
  model = build_model(config, num_classes)
  tx = optim.create_optimizer(config, plan)
  schedule = optim.learning_rate_schedule(plan)
  repl = sharding.replicated(mesh)
  init_fn = jax.jit(functools.partial(train.init_train_state, model=model,
                                      tx=tx, image_size=config.image_size),
                    out_shardings=repl)
  augment_fn = None
  if config.augment.on_device:
    from jaxclr.data import device_augment  # pylint: disable=g-import-not-at-top
    augment_fn = functools.partial(device_augment.augment_views,
                                   params=config_lib.data_spec(config).augment)
  step_fn = train.make_train_step(
      config=config, model=model, tx=tx, schedule=schedule, mesh=mesh,
      state_sharding=repl, batch_sharding=sharding.batch_sharded(mesh),
      replicated_sharding=repl, augment_fn=augment_fn)
  return Trainer(model=model, tx=tx, schedule=schedule, init_fn=init_fn,
                 step_fn=step_fn, state_sharding=repl)


def run(config, workdir: str) -> dict[str, float]:
  """Pretrains (or resumes) in `workdir`; returns the last logged metrics.

  Everything the user can get wrong (config, device layout, workdir) is
  checked before data is read or anything is compiled.

  Raises:
    Preempted: after saving at the current step on SIGTERM / preemption.
    NonFiniteError: policy 'stop' and a NaN/Inf loss or gradient norm.
  """
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh_axis_type)
  try:
    sharding.check_batch_divides(config.batch_size, mesh)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  is_primary = jax.process_index() == 0
  workdir_lib.prepare(workdir, config, is_primary=is_primary)
  # From here on a SIGTERM (single process) is deferred until after a step.
  preemption = PreemptionFlag()
  try:
    return _run(config, workdir, mesh, is_primary, preemption)
  finally:
    preemption.restore()


def _run(config, workdir, mesh, is_primary, preemption) -> dict[str, float]:
  data = config_lib.data_spec(config)
  train_source = input_pipeline.open_source(data, "train")
  info = input_pipeline.dataset_info(train_source)
  plan = optim.training_plan(config, info.num_train_examples)
  logging.info("jaxclr pretraining: %s", describe_run(config, plan, mesh))

  num_classes = info.num_classes if config.linear_probe else 0
  trainer = create_trainer(config, mesh, plan, num_classes)
  evaluator = periodic.PeriodicKnnEvaluator(config, mesh, trainer.model,
                                           info.num_classes)
  init_rng = jax.random.key(config.seed)

  store = checkpoint.CheckpointStore(
      os.path.join(workdir, workdir_lib.CHECKPOINT_DIR),
      save_every_steps=config.checkpoint_every_steps,
      max_to_keep=config.max_checkpoints_to_keep)
  try:
    restored = store.restore(trainer.abstract_state(init_rng))
  except BaseException:
    store.close()
    raise
  if restored is None:
    state, start_step = trainer.init_fn(init_rng), 0
  else:
    state, _, start_step = restored
    logging.info("Resumed from %s.", store.path(start_step))

  step_fn = trainer.step_fn
  batches = prefetch(
      sharding.global_batch(mesh, b) for b in input_pipeline.pretrain_batches(
          data, train_source, batch_size=config.batch_size,
          start_step=start_step, process_index=jax.process_index(),
          process_count=jax.process_count()))
  if jax.process_count() > 1 and start_step < plan.total_steps:
    # Compile, then start together: see distributed.compile_together.
    first = next(batches)
    step_fn = distributed.compile_together(step_fn, state, first)
    batches = itertools.chain([first], batches)
  logger = MetricsLogger(workdir, is_primary=is_primary,
                         total_steps=plan.total_steps,
                         batch_size=config.batch_size, start_step=start_step)
  meta = {"dataset": config.dataset, "num_classes": num_classes}
  last_logged: dict[str, float] = {}
  policy, skipped = config.nonfinite_policy, 0
  try:
    for step in range(start_step, plan.total_steps):
      state, metrics = step_fn(state, next(batches))
      done = step + 1
      if step == start_step:
        logger.reset_timer(done)  # Exclude compilation from throughput.
      if done % config.log_every_steps == 0 or done == plan.total_steps:
        host_metrics = jax.device_get(metrics)
        num_bad = int(jax.device_get(state.nonfinite)[1])
        last_logged = logger.log_train(  # The bad step's record, too.
            done, {**host_metrics, "epoch": done / plan.steps_per_epoch,
                   **({"skipped_updates": num_bad} if num_bad else {})})
        skipped = _check_finite(state, policy, store, skipped)
      eval_metrics = evaluator.maybe_evaluate(done, state)
      if eval_metrics:
        logger.log_scalars(done, eval_metrics)
        logger.reset_timer(done)  # Exclude evaluation from throughput.
      preempted = preemption.reached(store, done)
      if (done % config.checkpoint_every_steps == 0 or
          done == plan.total_steps or preempted):
        # Never save a state at or past a non-finite update ('stop').
        skipped = _check_finite(state, policy, store, skipped)
        store.save(done, state, {**meta, "step": done}, force=True)
      if preempted:
        store.wait_until_finished()  # The async save must be committed.
        logging.warning("Preempted: saved step %d to %s; re-run the same "
                        "command to resume.", done, store.path(done))
        raise Preempted(done, store.path(done))
    store.wait_until_finished()
  finally:
    store.close()  # Waits for an in-flight save (also on errors).
    logger.close()
  return last_logged
