"""kNN evaluation during pretraining (config.eval_every_steps > 0).

Every `eval_every_steps` steps the current encoder (inference mode: BatchNorm
moving statistics) embeds the labelled training split (the bank) and the eval
split (the queries), both with eval preprocessing, and the weighted kNN of
`knn.py` (k=200, tau=0.1) gives `eval/knn_top1`. The bank is sharded over the
mesh. Unlabelled datasets turn the evaluator off (with one log line). An
eval split that holds the bank's split is refused by pretrain.run before
training (`splits.check_held_out`), unless allow_eval_on_train.
"""

from __future__ import annotations

import jax
from absl import logging

from jaxclr.data import input_pipeline
from jaxclr.evaluation import encoder as encoder_lib, knn

MAX_CACHED_BYTES = 2**30  # Keep preprocessed eval images in memory below this.


class PeriodicKnnEvaluator:
  """`maybe_evaluate(step, state) -> dict | None` for the training loop."""

  def __init__(self, spec, mesh, model, num_classes: int, *, every: int,
               batch_size: int = 256, k: int = knn.DEFAULT_K,
               temperature: float = knn.DEFAULT_TEMPERATURE):
    self.spec, self.mesh, self.num_classes = spec, mesh, num_classes
    self.every = every
    self.k, self.temperature = k, temperature
    n = mesh.devices.size
    self.batch_size = max(n, batch_size // n * n)
    self._cache: dict[str, list] = {}
    self.enabled = self.every > 0 and num_classes > 0
    if self.every > 0 and num_classes <= 0:
      logging.warning("eval_every_steps=%d ignored: %s has no labels.",
                      self.every, spec.dataset)
    self._features = encoder_lib.make_feature_fn(model, mesh, feature_layer=0)

  def _batches(self, which: str):
    """which: 'labelled_train' (the bank) or 'eval' (the queries)."""
    if which in self._cache:
      return self._cache[which]
    src = input_pipeline.open_source(self.spec, which)
    it = input_pipeline.eval_batches(
        self.spec.image_size, src, self.batch_size, jax.process_index(),
        jax.process_count())
    small = (src.num_examples * self.spec.image_size**2 * 12
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
    bank, bank_labels = self._embed(variables, "labelled_train")
    queries, query_labels = self._embed(variables, "eval")
    acc = knn.knn_accuracy(queries, query_labels, bank, bank_labels,
                           num_classes=self.num_classes, k=self.k,
                           temperature=self.temperature, mesh=self.mesh)
    return {"eval/knn_top1": acc}

  def maybe_evaluate(self, step: int, state) -> dict[str, float] | None:
    if not self.enabled or step % self.every:
      return None
    return self.evaluate(state)
