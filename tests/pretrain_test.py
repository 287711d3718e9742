"""The pretraining job end to end on synthetic data: files, checkpoints, resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxclr import config as config_lib
from jaxclr.data import input_pipeline
from jaxclr.jobs import pretrain
from jaxclr.parallel import sharding
from jaxclr.training import checkpoint, optim, workdir as workdir_lib


TINY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs",
                           "synthetic_tiny.py")


def tiny_config(**overrides):
  c = config_lib.load_config_file(TINY_CONFIG, "steps=4,every=2")
  c.warmup_epochs = 0.5  # 2 steps: the logged lr shows the warmup.
  c.learning_rate = 0.3
  c.weight_decay = 1e-6
  for k, v in overrides.items():
    c[k] = v
  return c


def restore_state(config, workdir, step=None):
  mesh = sharding.make_mesh("explicit")
  info = input_pipeline.dataset_info(
      input_pipeline.open_source(config_lib.data_spec(config)))
  plan = optim.training_plan(config, info.num_train_examples)
  trainer = pretrain.create_trainer(config, mesh, plan, info.num_classes)
  store = checkpoint.CheckpointStore(
      os.path.join(workdir, workdir_lib.CHECKPOINT_DIR), save_every_steps=1,
      max_to_keep=10)
  try:
    state, meta, restored_step = store.restore(
        checkpoint.abstract_state(trainer.init_fn, jax.random.key(0)),
        step=step)
  finally:
    store.close()
  return jax.device_get(state), meta, restored_step


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  last = pretrain.run(tiny_config(), workdir)
  return workdir, last


@pytest.mark.slow
def test_workdir_contract(straight_run):
  workdir, last = straight_run
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["depth"] == 18
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for key in ("loss", "contrast_acc", "learning_rate", "images_per_sec",
              "probe_acc", "contrast_entropy"):
    assert all(np.isfinite(r[key]) for r in records), key
  assert records[-1]["loss"] == pytest.approx(last["loss"])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  # Warmup 0.5 epochs = 2 steps: lr is 0 at step 0, peak at step 2.
  plan_peak = 0.3 * 16 / 256
  assert records[0]["learning_rate"] == 0.0  # logged lr is that of step 0
  assert records[2]["learning_rate"] == pytest.approx(plan_peak, rel=1e-5)


def _event_images(workdir, tag):
  """{step: uint8 images} of an image summary in the workdir's events."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  found = {}
  for name in os.listdir(workdir):
    if not name.startswith("events.out.tfevents"):
      continue
    for record in tf.data.TFRecordDataset(os.path.join(workdir, name)):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.tag == tag:  # [width, height, png, png, ...] strings.
          pngs = tf.make_ndarray(value.tensor)[2:]
          found[event.step] = np.stack(
              [tf.io.decode_png(png).numpy() for png in pngs])
  return found


@pytest.mark.slow
def test_tensorboard_preview_is_the_first_batch_s_views(straight_run):
  """The augmented-views image summary at step 0 shows the pixels the first
  step trained on: an independently built first batch, both views side by
  side, as tf.summary.image converts floats to 8 bits."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  workdir, _ = straight_run
  config = tiny_config()
  spec = config_lib.data_spec(config)
  batch = next(input_pipeline.pretrain_batches(
      spec, input_pipeline.open_source(spec, "train"),
      batch_size=config.batch_size, start_step=0, process_index=0,
      process_count=1))
  images = _event_images(workdir, pretrain.PREVIEW_SUMMARY)
  assert list(images) == [0]
  views = np.asarray(batch["images"][:pretrain.PREVIEW_EXAMPLES], np.float32)
  to_8_bits = lambda x: tf.image.convert_image_dtype(
      x, tf.uint8, saturate=True).numpy()
  size = config.image_size
  assert images[0].shape == (pretrain.PREVIEW_EXAMPLES, size, 2 * size, 3)
  np.testing.assert_array_equal(images[0][:, :, :size], to_8_bits(views[:, 0]))
  np.testing.assert_array_equal(images[0][:, :, size:], to_8_bits(views[:, 1]))


@pytest.mark.slow
def test_checkpoint_holds_the_final_state(straight_run):
  workdir, _ = straight_run
  state, meta, step = restore_state(tiny_config(), workdir)
  assert step == 4 and int(state.step) == 4 and meta["step"] == 4
  assert int(optim.nonfinite_count(state.opt_state)) == 0


@pytest.mark.slow
def test_resume_from_an_earlier_checkpoint_equals_uninterrupted(
    straight_run, tmp_path):
  workdir, _ = straight_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  # As if the run had been killed after the step-2 checkpoint.
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  pretrain.run(tiny_config(), resumed)
  want, _, _ = restore_state(tiny_config(), workdir, step=4)
  got, _, _ = restore_state(tiny_config(), resumed, step=4)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    steps = [json.loads(l)["step"] for l in f]
  assert steps == [1, 2, 3, 4]  # Superseded records 3, 4 were replaced.


@pytest.mark.slow
def test_rerun_of_a_finished_workdir_trains_nothing(straight_run):
  workdir, _ = straight_run
  before = restore_state(tiny_config(), workdir)[0]
  assert pretrain.run(tiny_config(), workdir) == {}
  after = restore_state(tiny_config(), workdir)[0]
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_relative_workdir(straight_run, tmp_path, monkeypatch):
  # The README's quick start passes a relative --workdir; Orbax itself
  # only accepts absolute paths.
  monkeypatch.chdir(tmp_path)
  pretrain.run(tiny_config(), "runs/relative")
  workdir = str(tmp_path / "runs" / "relative")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  want, _, _ = restore_state(tiny_config(), straight_run[0], step=4)
  got, _, _ = restore_state(tiny_config(), workdir, step=4)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_config_mismatch_is_refused_and_lists_fields(straight_run):
  workdir, _ = straight_run
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"model.depth: 18 -> 34[\s\S]*simclr.temperature"):
    pretrain.run(tiny_config(simclr=dict(
        tiny_config().simclr.to_dict(), temperature=0.5), model=dict(
            tiny_config().model.to_dict(), depth=34)), workdir)
