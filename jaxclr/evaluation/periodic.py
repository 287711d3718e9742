"""kNN evaluation during pretraining (config.eval_every_steps > 0).

Every `eval_every_steps` steps the current encoder (inference mode: BatchNorm
moving statistics) embeds the labelled training split (the bank) and the eval
split (the queries), both with eval preprocessing, and the weighted kNN of
`knn.py` (k=200, tau=0.1) gives `eval/knn_top1`. The bank is sharded over the
mesh. Unlabelled datasets turn the evaluator off (with one log line).
"""

from __future__ import annotations

import jax
from absl import logging

from jaxclr import config_lib
from jaxclr.data import input_pipeline, sources
from jaxclr.evaluation import encoder as encoder_lib
from jaxclr.evaluation import knn
from jaxclr.parallel import sharding

MAX_CACHED_BYTES = 2**30  # Keep preprocessed eval images in memory below this.


class PeriodicKnnEvaluator:
  """`maybe_evaluate(step, state) -> dict | None` for the pretraining loop."""

  def __init__(self, config, mesh, model, num_classes: int, *,
               batch_size: int = 256, k: int = knn.DEFAULT_K,
               temperature: float = knn.DEFAULT_TEMPERATURE):
    self.config, self.mesh, self.num_classes = config, mesh, num_classes
    self.every = config.eval_every_steps
    self.k, self.temperature = k, temperature
    n = mesh.devices.size
    self.batch_size = max(n, batch_size // n * n)
    self._cache: dict[str, list] = {}
    self.enabled = self.every > 0 and num_classes > 0
    if self.every > 0 and num_classes <= 0:
      logging.warning("eval_every_steps=%d ignored: %s has no labels.",
                      self.every, config.dataset)

    def features(variables, images):
      return model.apply(variables, images, train=False)["h"]

    self._features = jax.jit(
        features, in_shardings=(sharding.replicated(mesh),
                                sharding.batch_sharded(mesh)),
        out_shardings=sharding.batch_sharded(mesh))

  def _batches(self, which: str):
    if which in self._cache:
      return self._cache[which]
    data = config_lib.data_spec(self.config)
    split = (sources.labelled_train_split(data) if which == "train"
             else sources.resolve_split(data, None, which))
    src = input_pipeline.open_source(data, which, split)
    it = input_pipeline.eval_batches(
        data.image_size, src, self.batch_size, jax.process_index(),
        jax.process_count())
    small = (src.num_examples * self.config.image_size**2 * 12
             <= MAX_CACHED_BYTES)
    if not small:
      return it
    self._cache[which] = list(it)
    return self._cache[which]

  def _embed(self, variables, which: str):
    return encoder_lib.extract_features(self._features, variables, self.mesh,
                                        self._batches(which))

  def evaluate(self, state) -> dict[str, float]:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    bank, bank_labels = self._embed(variables, "train")
    queries, query_labels = self._embed(variables, "eval")
    acc = knn.knn_accuracy(queries, query_labels, bank, bank_labels,
                           num_classes=self.num_classes, k=self.k,
                           temperature=self.temperature, mesh=self.mesh)
    return {"eval/knn_top1": acc}

  def maybe_evaluate(self, step: int, state) -> dict[str, float] | None:
    if not self.enabled or step % self.every:
      return None
    return self.evaluate(state)
