"""Per-device memory of a config's full pretraining step, without running it.

  python -m benchmarks.memory --config configs/imagenet.py \
      [--devices 8] [--per_device_batch 512] [--dtypes float32,bfloat16] \
      [--out memory.json]

Builds the step exactly as the job does (jobs.pretrain.create_trainer on a
mesh of --devices devices; on CPU they are simulated host devices), lowers
and compiles it for abstract inputs (jax.ShapeDtypeStruct: no state or batch
is ever allocated, so a 4096-image ImageNet step compiles on a laptop) and
reads XLA's memory analysis of the compiled per-device program: arguments
(state + the device's shard of the batch), outputs, aliased (donated) bytes
and temporaries. peak = arguments + outputs - aliased + temporaries.
Beside it, a figure that does not depend on a backend's buffer
assignment: the bytes JAX's autodiff keeps resident at once (state, one
gradient per parameter, the device's batch shard, and the activations the
forward saves for the backward, counted from the residuals of jax.vjp, by
dtype), before any compiler fuses or recomputes them. XLA:CPU has no native
bfloat16 and computes it in float32, so its bf16 peak says little about a
GPU's; the autodiff figure does shrink with bf16 activations.

The batch's structure (images, labels, ids, colour draws with on-device
augmentation, the transfer dtype) is taken from one real batch of the
config's input pipeline on synthetic images, with the batch dimension set to
devices x per_device_batch. The figure is XLA:CPU's buffer assignment when
run on CPU: GPU/TPU compilers schedule differently (and fuse more), so it is
an estimate of what an accelerator needs, not a measurement of one.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS

GIB = 1024 ** 3


def abstract_batch(config, global_batch: int, batch_sharding):
  """ShapeDtypeStructs of a global batch of the config's pipeline."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxclr import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxclr.data import input_pipeline  # pylint: disable=g-import-not-at-top
  small = config.copy_and_resolve_references()
  small.dataset = "synthetic"
  small.batch_size = 2
  small.synthetic.num_examples = 4
  spec = config_lib.data_spec(small)
  batch = next(input_pipeline.pretrain_batches(
      spec, input_pipeline.open_source(spec, "train"), batch_size=2,
      start_step=0, process_index=0, process_count=1))
  return {k: jax.ShapeDtypeStruct((global_batch,) + v.shape[1:], v.dtype,
                                  sharding=batch_sharding)
          for k, v in batch.items()}


def saved_for_backward_bytes(model, state, per_device_images) -> dict:
  """Bytes the forward pass of one device's shard saves for the backward
  (the residuals of jax.vjp through the model, by dtype): activations that
  must live from the forward to the backward on any backend. Found with
  jax.eval_shape, so nothing is computed or allocated."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def loss(params, batch_stats, images):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats},
                         images, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.square(out["z"].astype(jnp.float32)))

  unsharded = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  residuals = jax.tree.leaves(jax.eval_shape(
      lambda p, bs, im: jax.vjp(lambda q: loss(q, bs, im), p)[1],
      jax.tree.map(unsharded, state.params),
      jax.tree.map(unsharded, state.batch_stats),
      unsharded(per_device_images)))
  by_dtype: dict[str, int] = {}
  for r in residuals:
    by_dtype[str(r.dtype)] = by_dtype.get(str(r.dtype), 0) + (
        r.size * r.dtype.itemsize)
  return {"total": sum(by_dtype.values()), "by_dtype": by_dtype,
          "arrays": len(residuals)}


def accelerator_config(config, *, global_batch: int, compute_dtype: str):
  """config at `global_batch` and `compute_dtype`, with the convolution
  an accelerator runs: 'auto' would pick a CPU-only form (jaxclr/cpu) when
  this is compiled on the CPU backend."""
  config = config.copy_and_resolve_references()
  config.batch_size = global_batch
  config.model.compute_dtype = compute_dtype
  if config.model.conv_kernel_grad == "auto":
    config.model.conv_kernel_grad = "xla"
  if config.model.conv_library == "auto":
    config.model.conv_library = "xla"
  return config


def compile_step(config, mesh, *, compiler_options=None):
  """config's pretraining step built as the job builds it on `mesh`,
  compiled for abstract inputs (nothing allocated).

  Returns (trainer, compiled, state, batch, compile_s, warnings): state and
  batch are the jax.ShapeDtypeStructs it was compiled for. compiler_options
  are added to the step's own (e.g. for quicker probe compiles).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jaxclr.jobs import pretrain  # pylint: disable=g-import-not-at-top
  from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top
  from jaxclr.training import optim  # pylint: disable=g-import-not-at-top
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  sharding.check_batch_divides(config.batch_size, mesh)
  # The dataset's size only sets the schedule's length: no effect on memory.
  plan = optim.training_plan(config, num_examples=1_281_167)
  num_classes = 1000 if config.linear_probe else 0
  trainer = pretrain.create_trainer(config, mesh, plan, num_classes)
  # Explicit mesh axes type-check shardings: the abstract inputs carry them.
  repl = sharding.replicated(mesh)
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
      jax.eval_shape(trainer.init_fn, jax.random.key(0)))
  batch = abstract_batch(config, config.batch_size,
                         sharding.batch_sharded(mesh))
  compiled, compile_s, warnings = measure.compile_with_warnings(
      trainer.step_fn.lower(state, batch), compiler_options)
  return trainer, compiled, state, batch, compile_s, warnings


def step_memory(config, *, devices: int, per_device_batch: int,
                compute_dtype: str) -> dict:
  """Compiles config's step for abstract inputs; returns the memory record."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxclr.parallel import sharding  # pylint: disable=g-import-not-at-top
  from benchmarks import measure  # pylint: disable=g-import-not-at-top

  config = accelerator_config(config, global_batch=devices * per_device_batch,
                              compute_dtype=compute_dtype)
  if len(jax.devices()) < devices:
    raise SystemExit(f"--devices={devices} but {jax.devices()[0].platform} "
                     f"has {len(jax.devices())}; simulate them on CPU with "
                     "JAX_PLATFORMS=cpu")
  mesh = sharding.make_mesh(config.mesh_axis_type, jax.devices()[:devices])
  trainer, compiled, state, batch, compile_s, warnings = compile_step(
      config, mesh)
  mem = measure.memory(compiled)
  nbytes = lambda tree: int(sum(x.size * x.dtype.itemsize
                                for x in jax.tree.leaves(tree)))
  shard = jax.ShapeDtypeStruct(
      (2 * per_device_batch,) + batch["images"].shape[2:], jnp.float32)
  saved = saved_for_backward_bytes(trainer.model, state, shard)
  # What must be resident at once on any backend: the state, a gradient of
  # every parameter, the device's batch shard and the saved activations.
  resident = (nbytes(state) + nbytes(state.params) + nbytes(batch) // devices
              + saved["total"])
  return {"compute_dtype": compute_dtype, "devices": devices,
          "per_device_batch": per_device_batch,
          "global_batch": config.batch_size,
          "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
          "state_bytes": nbytes(state), "compile_s": compile_s,
          # XLA's count: remat's recomputation shows here.
          "flops_per_image": measure.cost_flops(compiled) * devices
                             / config.batch_size,
          "memory_per_device": mem, "peak_gib": mem["peak_bytes"] / GIB,
          "saved_for_backward": saved, "resident_bytes": resident,
          "resident_gib": resident / GIB,
          "fits_80gb": max(mem["peak_bytes"], resident) < 80e9,
          "compile_warnings": warnings}



def define_flags():
  """The command's flags: defined only when run as a program, so importing
  the module (tests, other benchmarks) does not clash with their --config."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                  lock_config=True)
  flags.DEFINE_integer("devices", 8,
                       "Devices in the mesh (on CPU, simulated).")
  flags.DEFINE_integer("per_device_batch", 512, "Images per device.")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "model.compute_dtype "
                    "values to compile.")
  flags.DEFINE_string("out", None, "Write the results as JSON here.")


def main(argv):
  del argv
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  records = []
  for dtype in FLAGS.dtypes:
    r = step_memory(FLAGS.config, devices=FLAGS.devices,
                    per_device_batch=FLAGS.per_device_batch,
                    compute_dtype=dtype)
    m = r["memory_per_device"]
    print(f"{dtype}: {r['devices']} devices x {r['per_device_batch']} images"
          f": peak {r['peak_gib']:.2f} GiB per device (arguments "
          f"{m['argument'] / GIB:.2f}, outputs {m['output'] / GIB:.2f}, "
          f"aliased {m['alias'] / GIB:.2f}, temporaries "
          f"{m['temp'] / GIB:.2f}); autodiff keeps "
          f"{r['resident_gib']:.2f} GiB (saved activations "
          f"{r['saved_for_backward']['total'] / GIB:.2f}); fits 80 GB: "
          f"{r['fits_80gb']}; {r['flops_per_image'] / 1e9:.1f} GFLOP/image; "
          f"compiled in {r['compile_s']:.0f} s", flush=True)
    records.append(r)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({**measure.run_record(), "records": records}, f, indent=2)


if __name__ == "__main__":
  define_flags()
  # Simulated devices must be requested before jax is imported.
  _devices = next((a.split("=", 1)[1] for a in sys.argv
                   if a.startswith("--devices=")), "8")
  os.environ.setdefault("XLA_FLAGS",
                        f"--xla_force_host_platform_device_count={_devices}")
  app.run(main)
