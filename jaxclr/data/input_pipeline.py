"""Pretraining input: the contract between the host pipeline and the trainer.

`pretrain_batches` yields process-local numpy batches:

  images:      float32 [b, 2, H, W, 3] in [0, 1]: two augmented views per image
  labels:      int32   [b], -1 when the dataset has no labels
  example_ids: int32   [b], the example's index in the training split

with b = batch_size // process_count. The global batch of step t is the
concatenation of the processes' batches in process order, and it depends only
on (seed, t): not on how many processes or devices there are. Resuming at
`start_step` yields exactly what an uninterrupted run would from that step.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from jaxclr.data import synthetic


class DataError(ValueError):
  """A dataset that cannot be used as configured (user error, no traceback)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_train_examples: int
  num_classes: int  # 0 when unlabelled.


def dataset_info(config) -> DatasetInfo:
  if config.dataset == "synthetic":
    return DatasetInfo("synthetic", config.synthetic.num_examples,
                       config.synthetic.num_classes)
  raise DataError(f"Unknown dataset {config.dataset!r}; valid: 'synthetic'")


def global_example_ids(seed: int, step: int, batch_size: int,
                       num_examples: int) -> np.ndarray:
  """Indices of the global batch at `step`: a fresh permutation per epoch.

  Batches never straddle an epoch boundary (drop-remainder), so an epoch is
  num_examples // batch_size steps.
  """
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch < 1:
    raise DataError(f"batch_size={batch_size} exceeds the {num_examples} "
                    "training examples")
  epoch, pos = divmod(step, steps_per_epoch)
  perm = np.random.default_rng([seed, 3, epoch]).permutation(num_examples)
  return perm[pos * batch_size:(pos + 1) * batch_size]


def pretrain_batches(config, *, start_step: int, process_index: int,
                     process_count: int) -> Iterator[dict[str, np.ndarray]]:
  info = dataset_info(config)
  local_batch = config.batch_size // process_count
  step = start_step
  while True:
    ids = global_example_ids(config.seed, step, config.batch_size,
                             info.num_train_examples)
    ids = ids[process_index * local_batch:(process_index + 1) * local_batch]
    images = np.stack([
        synthetic.two_views(config.seed, step, int(i),
                            synthetic.example_image(config.seed, int(i),
                                                    config.image_size))
        for i in ids])
    labels = np.array([synthetic.example_label(config.seed, int(i),
                                               info.num_classes) for i in ids],
                      np.int32)
    yield {"images": images, "labels": labels,
           "example_ids": ids.astype(np.int32)}
    step += 1
