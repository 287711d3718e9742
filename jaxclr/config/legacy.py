"""Saved configs of older jaxclr versions, read as today's fields, so that
such a workdir still resumes, evaluates and reports as it was trained:
the flat objective fields from before the method sections (jaxclr <=
2739732), and fields added later whose default computes something else than
the run did (each method says which: Method.upgrade_saved)."""

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
  return _as_it_ran(_sections(raw))


def _as_it_ran(raw: dict) -> dict:
  """The trained method's section with the fields added since the run
  started set to what the run computed (Method.upgrade_saved)."""
  from jaxclr import methods  # pylint: disable=g-import-not-at-top
  name = raw.get("method", "simclr")
  section = raw.get(name)
  if name not in methods.names() or not isinstance(section, dict):
    return raw
  upgraded = methods.get(name).upgrade_saved(dict(section))
  return raw if upgraded == section else {**raw, name: upgraded}


def _sections(raw: dict) -> dict:
  """The flat objective fields of jaxclr <= 2739732 as method sections."""
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
