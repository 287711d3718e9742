"""benchmarks/memory.py on the tiny config: the compiled step's arguments
hold the replicated state, and the activations saved for the backward grow
linearly with the per-device batch and shrink with bfloat16 compute."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import memory  # noqa: E402
from jaxclr import config as config_lib  # noqa: E402
from jaxclr.jobs import pretrain
from jaxclr.parallel import sharding  # noqa: E402
from jaxclr.training import optim

import train_test  # noqa: E402


def _saved(config, images_per_device):
  mesh = sharding.make_mesh("explicit", jax.devices()[:1])
  plan = optim.training_plan(config, 64)
  trainer = pretrain.create_trainer(config, mesh, plan, 0)
  state = jax.eval_shape(trainer.init_fn, jax.random.key(0))
  shard = jax.ShapeDtypeStruct(
      (2 * images_per_device, config.image_size, config.image_size, 3),
      jnp.float32)
  return memory.saved_for_backward_bytes(trainer.model, state, shard)


@pytest.mark.slow
def test_saved_activations_are_linear_in_the_batch_and_halve_in_bf16():
  c = config_lib.load_config_file(train_test.TINY_CONFIG)
  s1, s2, s4 = (_saved(c, n)["total"] for n in (1, 2, 4))
  per_image = s2 - s1
  assert per_image > 0 and s4 - s2 == 2 * per_image  # Exactly linear.
  c.model.compute_dtype = "bfloat16"
  b1, b2 = (_saved(c, n) for n in (1, 2))
  assert "bfloat16" in b2["by_dtype"]
  # Activations in bf16 are half the bytes; float32 ones stay (BN stats).
  assert per_image / 2 <= b2["total"] - b1["total"] < per_image


@pytest.mark.slow
def test_compiled_arguments_hold_the_replicated_state():
  c = config_lib.load_config_file(train_test.TINY_CONFIG)
  r = memory.step_memory(c, devices=2, per_device_batch=4,
                         compute_dtype="float32")
  m = r["memory_per_device"]
  assert r["global_batch"] == 8
  assert m["argument"] >= r["state_bytes"]
  assert m["alias"] > 0.99 * r["state_bytes"]  # The state is donated.
  assert m["peak_bytes"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
  assert r["resident_bytes"] >= r["state_bytes"] + r["saved_for_backward"][
      "total"]
