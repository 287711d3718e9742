"""Saved configs from before the method sections (jaxclr <= 2739732): their
flat objective fields, read as today's `config.<method>.*` fields, so that
such a workdir still resumes, evaluates and reports as it was trained."""

from __future__ import annotations

# Flat field -> (the methods that read it, its name in their section).
_FLAT_FIELDS = {
    "loss": (("simclr",), "loss"),
    "temperature": (("simclr", "supcon", "nnclr"), "temperature"),
    "hidden_norm": (("simclr", "supcon"), "hidden_norm"),
    "triplet_margin": (("simclr",), "margin"),
    "infonce_queue_size": (("simclr",), "queue_size"),
    "byol_tau_base": (("byol",), "tau_base"),
    "predictor_hidden_dim": (("byol", "nnclr"), "predictor_hidden_dim"),
    "nnclr_queue_size": (("nnclr",), "queue_size"),
}

# The methods that had loss_labels, and what None meant for each.
_POSITIVES = {"simclr": "instance", "supcon": "class"}


def upgrade(raw: dict) -> dict:
  """A saved pretraining config dict in today's layout (a copy); a config
  already in it is returned unchanged."""
  if not any(k in raw for k in (*_FLAT_FIELDS, "loss_labels")):
    return raw
  raw = dict(raw)
  method = raw.get("method", "simclr")
  for flat, (readers, name) in _FLAT_FIELDS.items():
    value = raw.pop(flat, None)
    if value is not None and method in readers:
      raw[method] = {**raw.get(method, {}), name: value}
  labels = raw.pop("loss_labels", None)
  if method in _POSITIVES:  # loss_labels=None meant the method's default.
    raw[method] = {**raw.get(method, {}),
                   "positives": labels or _POSITIVES[method]}
  return raw
