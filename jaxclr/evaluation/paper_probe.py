"""SimCLR's linear-evaluation protocol (P1 B.6; SIMCLR_REFERENCE.md 6.1, 6.3).

A linear classifier (Dense with bias, N(0, 0.01) kernel) on the frozen
encoder's features, run in inference mode (BatchNorm moving statistics),
trained on random crop + flip views of the labelled training split with SGD,
Nesterov momentum 0.9, lr = base_lr x B / 256 (base 0.1) with cosine decay to
0, no warmup, no weight decay. Every step re-runs the frozen encoder on the
new views (that is what makes it slower than the fast protocol). Evaluation:
centre-cropped eval split, top-1/top-5.

The head trains in its own Orbax checkpoints under OUT/checkpoints, so the job
resumes after an interruption; its data order is a function of (seed, step).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxclr import config_lib
from jaxclr.data import input_pipeline
from jaxclr.evaluation import encoder as encoder_lib
from jaxclr.metrics import MetricsLogger
from jaxclr.models.heads import LinearHead
from jaxclr.parallel import sharding


def run_paper_probe(config, encoder: encoder_lib.FrozenEncoder, data_config,
                    mesh, workdir: str, num_classes: int, eval_features,
                    eval_feature_fn) -> dict:
  """Trains the head (resuming from workdir/checkpoints); returns metrics."""
  data = config_lib.data_spec(data_config)
  train_source = input_pipeline.open_source(data, "train")
  n_train = train_source.num_examples
  batch_size = config.batch_size
  steps_per_epoch = n_train // batch_size
  total_steps = max(1, int(round(config.num_epochs * steps_per_epoch)))
  peak_lr = config.learning_rate * batch_size / 256.0
  schedule = optax.cosine_decay_schedule(peak_lr, total_steps)
  tx = optax.sgd(schedule, momentum=config.momentum, nesterov=True)
  head = LinearHead(num_classes)
  feature_fn = eval_feature_fn
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  dim = jax.eval_shape(feature_fn, encoder.variables, jax.ShapeDtypeStruct(
      (batch_size, data_config.image_size, data_config.image_size, 3),
      jnp.float32, sharding=batch_sh)).shape[-1]

  def init(rng):
    params = head.init(rng, jnp.zeros((1, dim)))["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params)}

  init = jax.jit(init, out_shardings=repl)

  def step_fn(state, variables, images, labels):
    feats = jax.lax.stop_gradient(feature_fn(variables, images))

    def loss_fn(params):
      logits = head.apply({"params": params}, feats)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, {"loss": loss,
                                      "learning_rate": schedule(state["step"])}

  step_fn = jax.jit(step_fn, in_shardings=(repl, repl, batch_sh, batch_sh),
                    out_shardings=(repl, repl), donate_argnums=0)

  rng = jax.random.key(config.seed)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
      jax.eval_shape(init, rng))
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True, save_interval_steps=config.checkpoint_every_steps))
  latest = manager.latest_step()
  if latest is None:
    state, start = init(rng), 0
  else:
    state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
    start = int(latest)
  logger = MetricsLogger(workdir, is_primary=jax.process_index() == 0,
                         total_steps=total_steps, batch_size=batch_size,
                         start_step=start)
  batches = input_pipeline.labelled_batches(
      data, train_source, batch_size=batch_size, start_step=start,
      process_index=jax.process_index(), process_count=jax.process_count())
  try:
    for step in range(start, total_steps):
      b = sharding.global_batch(mesh, next(batches))
      state, metrics = step_fn(state, encoder.variables, b["images"],
                               b["labels"])
      done = step + 1
      if done % config.log_every_steps == 0 or done == total_steps:
        logger.log_train(done, {**jax.device_get(metrics),
                                "epoch": done / steps_per_epoch})
      manager.save(done, args=ocp.args.StandardSave(state),
                   force=done == total_steps)
    manager.wait_until_finished()
  finally:
    manager.close()
    logger.close()
  params = jax.device_get(state["params"])["Dense_0"]
  feats, labels = eval_features
  logits = feats @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
  from jaxclr.evaluation import linear  # pylint: disable=g-import-not-at-top
  return {"top1": linear.top_k_accuracy(logits, labels, 1),
          "top5": linear.top_k_accuracy(logits, labels, 5),
          "steps": total_steps, "epochs": config.num_epochs,
          "resumed_from_step": start,
          "peak_learning_rate": peak_lr, "batch_size": batch_size}
