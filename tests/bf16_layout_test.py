"""bfloat16 is layout-invariant: the flagship recipe's step (configs/
imagenet.py:tiny, bfloat16) gives the same state on 1, 2 and 8 devices to
float32 round-off, and each of the four classic data-parallel bugs,
planted in turn, fails the same comparison by far more.

Why one step is compared to the float32 tolerances of train_test.py: after
the same casts (models/precision.py, with XLA told to keep them), the
layouts differ only in the order of float32 sums (BatchNorm statistics,
gradient partial sums). From the second step on, such a difference
occasionally moves a value across a bfloat16 rounding boundary, a 2^-9
jump that training then carries on: measured on this recipe, 8 vs 1
device, parameters 1.2e-8 apart after one step and 1.4e-3 after two, the
second step's loss 1.5e-4 apart (benchmarks/RESULTS.md, "bfloat16 across
device layouts"). Those later steps are held to the issue's 0.5 % on the
logged loss (test_three_step_losses_agree) and are no bug detector.
"""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_test
from jaxclr import config as config_lib, losses
from jaxclr.data import input_pipeline
from jaxclr.jobs import pretrain
from jaxclr.losses import common as losses_common
from jaxclr.models import heads, resnet
from jaxclr.parallel import sharding
from jaxclr.training import optim, state as state_lib

# Each test compiles and runs the whole step on its layout (30 s to
# minutes on the 2-core CPU).
pytestmark = pytest.mark.slow

IMAGENET_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs",
                               "imagenet.py")
NUM_STEPS = 3  # The table; the state is compared after the first.
# The acceptance figure for the logged losses of steps 2 and 3.
LOSS_TABLE_RTOL = 5e-3


def bf16_config():
  """The ImageNet recipe at CPU size: bfloat16, colour and blur on device,
  uint8 views. XLA's own convolutions (the step an accelerator runs)."""
  config = config_lib.load_config_file(IMAGENET_CONFIG, "tiny")
  assert config.model.compute_dtype == "bfloat16"
  config.num_train_steps = NUM_STEPS
  config.model.conv_kernel_grad = "xla"
  config.model.conv_library = "xla"
  return config


@dataclasses.dataclass
class Run:
  state: object  # After the first step (host copy).
  metrics: dict  # Of the first step.
  losses: list  # Logged loss of every step.


def run(mesh) -> Run:
  config = bf16_config()
  data = config_lib.data_spec(config)
  src = input_pipeline.open_source(data, "train")
  info = input_pipeline.dataset_info(src)
  plan = optim.training_plan(config, info.num_train_examples)
  trainer = pretrain.create_trainer(config, mesh, plan, info.num_classes)
  state = trainer.init_fn(jax.random.key(config.seed))
  batches = input_pipeline.pretrain_batches(
      data, src, batch_size=config.batch_size, start_step=0, process_index=0,
      process_count=1)
  first, step_losses = None, []
  for _ in range(NUM_STEPS):
    state, metrics = trainer.step_fn(
        state, sharding.global_batch(mesh, next(batches)))
    if first is None:
      first = Run(jax.device_get(state), jax.device_get(metrics), [])
    step_losses.append(float(metrics["loss"]))
  first.losses = step_losses
  return first


def mesh_of(num_devices, axis_type="explicit"):
  return sharding.make_mesh(axis_type, jax.devices()[:num_devices])


@functools.lru_cache(maxsize=None)
def one_device():
  return run(mesh_of(1))


def assert_same_step(got: Run, want: Run):
  """train_test's float32 tolerances, on the state after one step and the
  step's metrics."""
  train_test.assert_same_state(got.state, want.state)
  for key in ("loss", "contrast_acc", "probe_loss", "grad_norm"):
    np.testing.assert_allclose(got.metrics[key], want.metrics[key],
                               rtol=train_test.METRIC_RTOL, err_msg=key)


def worst_difference(got: Run, want: Run) -> float:
  """The largest relative difference the comparison looks at, each over
  its own tolerance (so > 1 fails): how far a planted bug lands."""
  ratios = []
  for name, rtol in train_test.WHOLE_TREE_RTOL.items():
    ratios.append(train_test.relative_difference(
        train_test.flat_concat(getattr(got.state, name)),
        train_test.flat_concat(getattr(want.state, name))) / rtol)
  for key in ("loss", "contrast_acc", "probe_loss", "grad_norm"):
    ratios.append(train_test.relative_difference(
        got.metrics[key], want.metrics[key]) / train_test.METRIC_RTOL)
  return max(ratios)


@pytest.mark.parametrize("num_devices,axis_type", [
    (1, "explicit"), (2, "explicit"), (8, "explicit"), (8, "auto")])
def test_bfloat16_step_is_layout_invariant(num_devices, axis_type):
  want = one_device()
  got = run(mesh_of(num_devices, axis_type))
  assert_same_step(got, want)
  if num_devices == 1:  # The same program: bitwise.
    jax.tree.map(np.testing.assert_array_equal, got.state, want.state)


def test_three_step_losses_agree():
  """The issue's table: the logged losses of 3 steps on 1, 2 and 8 devices
  within 0.5 % of each other (measured: benchmarks/RESULTS.md)."""
  runs = [one_device()] + [run(mesh_of(n)) for n in (2, 8)]
  table = np.array([r.losses for r in runs])  # [layout, step]
  spread = (table.max(0) - table.min(0)) / table.min(0)
  assert np.all(spread < LOSS_TABLE_RTOL), table


# The four classic bugs, each planted in the real code of an 8-device run.


def local_negatives(monkeypatch, num_devices):
  """Each device contrasts its own rows only."""
  del num_devices
  buggy = dataclasses.replace(losses.get("nt_xent"),
                              fn=train_test.local_negatives_nt_xent)
  monkeypatch.setitem(losses._REGISTRY, "nt_xent", buggy)  # pylint: disable=protected-access


def no_gradient_through_gather(monkeypatch, num_devices):
  """The gathered columns are constants: only the anchors get gradients."""
  del num_devices
  real = losses_common.gather_rows

  def gather_rows(x, axis_name):
    cols, offset = real(x, axis_name)
    return jax.lax.stop_gradient(cols), offset

  monkeypatch.setattr(losses_common, "gather_rows", gather_rows)


def gradients_averaged_twice(monkeypatch, num_devices):
  """The global gradient divided by the device count once more."""
  real = state_lib.apply_gradients

  def apply_gradients(state, grads, batch_stats, optimizer):
    grads = jax.tree.map(lambda g: g / num_devices, grads)
    return real(state, grads, batch_stats, optimizer)

  monkeypatch.setattr(state_lib, "apply_gradients", apply_gradients)


class PerDeviceBatchNorm(nn.BatchNorm):
  """nn.BatchNorm (same variables) whose statistics are each device's own:
  the global batch is split into `num_groups` contiguous blocks, the
  devices' shards, as BatchNorm without an axis_name under pmap."""
  num_groups: int = 1

  @nn.compact
  def __call__(self, x, use_running_average=None):
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,),
                            jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,),
                           jnp.float32)
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      # (init sees a 2-image dummy batch: one group then.)
      num_groups = 1 if self.is_initializing() else self.num_groups
      groups = xf.reshape((num_groups, -1) + x.shape[1:])
      axes = tuple(range(1, groups.ndim - 1))
      group_mean = groups.mean(axes, keepdims=True)
      group_var = jnp.square(groups - group_mean).mean(axes, keepdims=True)
      shape = (-1,) + x.shape[1:-1] + (features,)
      mean = jnp.broadcast_to(group_mean, groups.shape).reshape(shape)
      var = jnp.broadcast_to(group_var, groups.shape).reshape(shape)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * group_mean.mean(
            tuple(range(groups.ndim - 1)))
        ra_var.value = m * ra_var.value + (1 - m) * group_var.mean(
            tuple(range(groups.ndim - 1)))
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param("scale", self.scale_init, (features,), jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (features,), jnp.float32)
    return y.astype(self.dtype or x.dtype)


def batch_norm_per_device(monkeypatch, num_devices):
  real = resnet.make_batch_norm

  def make_batch_norm(train, momentum, epsilon, dtype):
    kwargs = real(train, momentum, epsilon, dtype).keywords
    kwargs.pop("force_float32_reductions", None)
    return functools.partial(PerDeviceBatchNorm, num_groups=num_devices,
                             **kwargs)

  monkeypatch.setattr(resnet, "make_batch_norm", make_batch_norm)
  monkeypatch.setattr(heads, "make_batch_norm", make_batch_norm)


BUGS = {f.__name__: f for f in (local_negatives, no_gradient_through_gather,
                                gradients_averaged_twice,
                                batch_norm_per_device)}


@pytest.mark.parametrize("bug", BUGS)
def test_each_classic_bug_fails_the_bfloat16_comparison(monkeypatch, bug):
  want = one_device()  # The real code, before anything is planted.
  num_devices = 8
  BUGS[bug](monkeypatch, num_devices)
  got = run(mesh_of(num_devices))
  with pytest.raises(AssertionError):
    assert_same_step(got, want)
  # Not near the edge: the bug lands far outside the tolerance.
  assert worst_difference(got, want) > 100, bug
