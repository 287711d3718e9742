"""Multi-crop views (augment.num_local_crops): the local crops' sizes and
area ranges against a model of TF's sampler, each view a pure function of
(seed, step, example id, view), independent of the process layout and of
a resume, the global views unchanged by adding local ones, device colour
equal to host colour, and the config rules."""

import functools
import math

import jax
import numpy as np
import pytest
import tensorflow as tf

from jaxclr import config as config_lib
from jaxclr.data import augment, device_augment, input_pipeline, spec

import augment_test
import methods_util


def _config(dataset="digits", image_size=32, batch_size=16, **aug):
  c = config_lib.base_config()
  c.dataset, c.image_size, c.batch_size, c.seed = (dataset, image_size,
                                                   batch_size, 5)
  c.synthetic.num_examples = 64
  c.augment.update(use_blur=False, color_jitter_strength=0.5,
                   local_crop_size=12, local_crop_area_range=(0.05, 0.4))
  c.augment.update(aug)
  return c


def _take(config, start_step, n, index=0, count=1):
  data = config_lib.data_spec(config)
  it = input_pipeline.pretrain_batches(
      data, input_pipeline.open_source(data, "train"),
      batch_size=config.batch_size, start_step=start_step,
      process_index=index, process_count=count)
  return [next(it) for _ in range(n)]


def _simulate_tf_crop(rng, height, width, n, area_range, min_covered):
  """An independent NumPy model of tf.image.sample_distorted_bounding_box
  (TF's sample_distorted_bounding_box_op.cc, docs/simclr.md section 4.2):
  aspect uniform in [3/4, 4/3], height uniform between the heights that
  bound the area, 100 attempts, then the whole image."""
  lo, hi = area_range
  total = height * width
  areas = []
  for _ in range(n):
    for _ in range(100):
      a = rng.uniform(3 / 4, 4 / 3)
      h_min = int(np.rint(math.sqrt(lo * total / a)))
      h_max = int(np.rint(math.sqrt(hi * total / a)))
      while np.rint(h_max * a) > width:
        h_max -= 1
      h_max = min(h_max, height)
      if h_max < h_min:
        continue
      h = rng.integers(h_min, h_max + 1)
      w = int(np.rint(h * a))
      area = h * w
      if area < lo * total or area > hi * total or w > width or w < 1:
        continue
      if area < min_covered * total:
        continue
      areas.append(area / total)
      break
    else:
      areas.append(1.0)
  return np.array(areas)


@pytest.mark.slow
@pytest.mark.parametrize("area_range", [(0.05, 0.14), (0.05, 0.4)])
def test_local_crop_areas_follow_their_own_range(area_range):
  """Local crops draw their area from local_crop_area_range alone (the
  global views' min_object_covered=0.1 would forbid crops under 10%)."""
  size, n = 224, 2000
  aug = augment_test._aug(local_crop_area_range=area_range)  # pylint: disable=protected-access

  def box(i):
    s = augment.view_seed(0, 0, i, 2)
    return augment.crop_window(tf.constant([size, size, 3]), s, aug,
                               local=True)[1]

  sizes = np.stack(list(tf.data.Dataset.range(n).map(box)
                        .as_numpy_iterator()))
  h, w = sizes[:, 0].astype(float), sizes[:, 1].astype(float)
  area = h * w / size**2
  lo, hi = area_range
  assert area.min() >= lo - 1e-9 and area.max() <= hi + 1e-9
  assert ((w / h <= 4 / 3 + 0.5 / h + 1e-9) &
          (w / h >= 3 / 4 - 0.5 / h - 1e-9)).all()
  sim = _simulate_tf_crop(np.random.default_rng(1), size, size, n,
                          area_range, 0.0)
  se = math.sqrt(area.var() / n + sim.var() / n)
  assert abs(area.mean() - sim.mean()) < 4 * se, (area.mean(), sim.mean())
  for q in (0.1, 0.5, 0.9):
    assert abs(np.quantile(area, q) - np.quantile(sim, q)) < 0.02 * hi
  # The same draws as global crops would never go under 10% of the image.
  def global_box(i):
    s = augment.view_seed(0, 0, i, 2)
    return augment.crop_window(tf.constant([size, size, 3]), s, aug)[1]
  g = np.stack(list(tf.data.Dataset.range(200).map(global_box)
                    .as_numpy_iterator()))
  assert (g[:, 0] * g[:, 1] / size**2).min() >= 0.1 - 1e-9


@pytest.mark.slow
def test_batch_gains_local_crops_and_keeps_the_global_views():
  plain = _take(_config(), 2, 1)[0]
  multi = _take(_config(num_local_crops=3), 2, 1)[0]
  assert set(multi) == set(plain) | {"local_images"}
  assert multi["local_images"].shape == (16, 3, 12, 12, 3)
  assert multi["local_images"].dtype == np.float32
  assert 0.0 <= multi["local_images"].min() <= multi["local_images"].max() <= 1
  # The global views' streams are untouched: bit for bit the same batch.
  for key in plain:
    np.testing.assert_array_equal(multi[key], plain[key], err_msg=key)


@pytest.mark.slow
def test_each_local_crop_is_its_own_keyed_view():
  """Local crop j of example e at step t is pretrain_view with the key
  (seed, t, e, 2 + j), computed here one by one outside tf.data; so crops
  are independent draws (they differ from each other)."""
  config = _config(num_local_crops=3)
  step = 4
  batch = _take(config, step, 1)[0]
  data = config_lib.data_spec(config)
  src = input_pipeline.open_source(data, "train")
  for row in (0, 7):
    eid = int(batch["example_ids"][row])
    image = tf.image.convert_image_dtype(src.images[eid], tf.float32)
    for j in range(3):
      want, _ = augment.pretrain_view(
          image, augment.view_seed(data.seed, step, eid, 2 + j), data.augment,
          12, local=True)
      np.testing.assert_allclose(batch["local_images"][row, j], want.numpy(),
                                 rtol=0, atol=1e-6)
  local = batch["local_images"]
  for a, b in ((0, 1), (0, 2), (1, 2)):
    assert (np.abs(local[:, a] - local[:, b]).mean(axis=(1, 2, 3))
            > 1e-3).all(), (a, b)


@pytest.mark.slow
def test_local_crops_are_independent_of_layout_and_resume():
  config = _config(num_local_crops=2, on_device=True)
  one = _take(config, 0, 3)
  two = [_take(config, 0, 3, index=p, count=2) for p in range(2)]
  resumed = _take(config, 2, 1)[0]
  for t in range(3):
    for key in ("local_images", "local_color_params", "example_ids"):
      np.testing.assert_array_equal(
          one[t][key], np.concatenate([two[0][t][key], two[1][t][key]]),
          err_msg=key)
  for key in ("local_images", "local_color_params"):
    np.testing.assert_array_equal(resumed[key], one[2][key])
  assert one[0]["local_color_params"].shape == (16, 2, spec.NUM_COLOR_PARAMS)


@pytest.mark.slow
def test_uint8_local_crops_are_the_rounded_float_ones():
  exact = _take(_config(num_local_crops=2), 1, 1)[0]
  packed = _take(_config(num_local_crops=2, transfer_dtype="uint8"), 1, 1)[0]
  assert packed["local_images"].dtype == np.uint8
  np.testing.assert_array_equal(
      packed["local_images"],
      np.round(exact["local_images"] * 255).astype(np.uint8))


@pytest.mark.slow
def test_device_colour_of_local_crops_equals_host_colour():
  """Colour, grayscale and blur (its kernel sized for the 24 px local
  crop: 3 taps) on device from the shipped parameters, against the host's
  local crops on the same stream."""
  views = {}
  for on_device in (False, True):
    c = _config(dataset="synthetic", image_size=48, batch_size=64,
                num_local_crops=2, local_crop_size=24, on_device=on_device,
                use_blur=True, color_jitter_strength=1.0)
    views[on_device] = _take(c, 5, 1)[0]
  params = config_lib.data_spec(c).augment
  fn = jax.jit(functools.partial(device_augment.augment_views, params=params))
  shipped = views[True]
  got = np.asarray(fn(shipped["local_images"], shipped["local_color_params"]))
  err = np.abs(got - views[False]["local_images"]).max()
  assert err <= augment_test.PARITY_ATOL, err
  p = shipped["local_color_params"]
  for k in (spec.JITTER, spec.GRAY, spec.BLUR):
    assert 0 < p[..., k].sum() < p[..., k].size, k


@pytest.mark.parametrize("fields,message", [
    ({"augment__num_local_crops": 2},
     r"^augment.num_local_crops=2 but method='simclr' trains on the two "
     r"global views only; set it to 0, or use a method that reads local "
     r"crops \(dino, swav\)$"),
    ({"method": "dino", "augment__num_local_crops": -1},
     r"^augment.num_local_crops=-1 must be an int >= 0"),
    ({"method": "dino", "augment__num_local_crops": 2,
      "augment__local_crop_size": 9},
     r"^augment.local_crop_size=9 must be an int in \[1, image_size=8\]"),
    ({"method": "swav", "augment__num_local_crops": 2,
      "augment__local_crop_size": 4,
      "augment__local_crop_area_range": (0.5, 0.2)},
     r"^augment.local_crop_area_range=\(0.5, 0.2\) must be \(min, max\)"),
])
def test_bad_multicrop_fields_are_refused_in_one_line(fields, message):
  config = methods_util.tiny_config(**fields)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_multicrop_validates_for_the_methods_that_read_it():
  for method in ("dino", "swav"):
    config_lib.validate(methods_util.tiny_config(
        method=method, augment__num_local_crops=2,
        augment__local_crop_size=4))
