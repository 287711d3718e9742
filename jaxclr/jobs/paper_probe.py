"""SimCLR's linear-evaluation protocol (P1 B.6; docs/simclr.md 6.1, 6.3).

A linear classifier (Dense with bias, N(0, 0.01) kernel) on the frozen
encoder's features, run in inference mode (BatchNorm moving statistics),
trained on random crop + flip views of the labelled training split with SGD,
Nesterov momentum 0.9, lr = base_lr x B / 256 (base 0.1) with cosine decay to
0, no warmup, no weight decay, for `optim.training_plan`'s number of steps
(num_examples x epochs // B + 1, as every jaxclr job and the reference).
Every step re-runs the frozen encoder on the new views (that is what makes
it slower than the fast protocol). Evaluation: centre-cropped eval split,
top-1/top-5.

The head trains through jaxclr.training.loop in its own checkpoints under
OUT/checkpoints, so the job resumes after an interruption; its data order is
a function of (seed, step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclr.data import input_pipeline
from jaxclr.evaluation import encoder as encoder_lib, linear
from jaxclr.models.heads import LinearHead
from jaxclr.parallel import sharding
from jaxclr.training import loop, optim, state as state_lib


def _init(rng, *, head, optimizer, feature_dim):
  params = head.init(rng, jnp.zeros((1, feature_dim)))["params"]
  return state_lib.create(params, {}, optimizer)


def _step(state, batch, variables, *, model, feature_layer, head, optimizer):
  out = model.apply(variables, batch["images"].astype(jnp.float32),
                    train=False)
  feats = jax.lax.stop_gradient(
      encoder_lib.select_features(out, feature_layer))

  def loss_fn(params):
    logits = head.apply({"params": params}, feats)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["labels"]).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state, metrics = state_lib.apply_gradients(state, grads, {}, optimizer)
  return state, {"loss": loss, **metrics}


def run_paper_probe(config, encoder: encoder_lib.FrozenEncoder, spec, mesh,
                    workdir: str, num_classes: int, eval_features) -> dict:
  """Trains the head (resuming from workdir/checkpoints); returns metrics."""
  src = input_pipeline.open_source(spec, "train")
  plan = optim.training_plan(config, src.num_examples)
  optimizer = optim.sgd_nesterov(optim.learning_rate_schedule(plan),
                                 momentum=config.momentum)
  head = LinearHead(num_classes)
  dim = eval_features[0].shape[1]
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  init = jax.jit(functools.partial(_init, head=head, optimizer=optimizer,
                                   feature_dim=dim), out_shardings=repl)
  step = jax.jit(
      functools.partial(_step, model=encoder.model,
                        feature_layer=config.feature_layer, head=head,
                        optimizer=optimizer),
      in_shardings=(repl, batch_sh, repl), out_shardings=(repl, repl),
      donate_argnums=0)
  rng = jax.random.key(config.seed)

  def batches(start_step):
    return input_pipeline.labelled_batches(
        spec, src, batch_size=config.batch_size, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())

  job = loop.Job(
      name="linear probe (paper protocol)", init_state=init, init_args=(rng,),
      step=step, step_args=(encoder.variables,), batches=batches,
      total_steps=plan.total_steps, steps_per_epoch=plan.steps_per_epoch,
      batch_size=config.batch_size)
  result = loop.run(job, workdir=workdir, mesh=mesh,
                    cadence=loop.Cadence.from_config(config))
  params = jax.device_get(result.state.params)["Dense_0"]
  feats, labels = eval_features
  logits = feats @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
  return {"top1": linear.top_k_accuracy(logits, labels, 1),
          "top5": linear.top_k_accuracy(logits, labels, 5),
          "steps": plan.total_steps, "epochs": config.num_epochs,
          "resumed_from_step": result.start_step,
          "peak_learning_rate": plan.peak_learning_rate,
          "batch_size": config.batch_size}
