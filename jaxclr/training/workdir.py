"""What a workdir holds, and the guard against resuming with another config.

DIR/config.json       the resolved config of the run (written once)
DIR/checkpoints/<N>/  Orbax checkpoints
DIR/metrics.jsonl     one JSON record per logged step
DIR/events.out.*      TensorBoard
DIR/jaxclr.lock       the job using it (workdir_lock.py), while it runs
"""

from __future__ import annotations

import json
import os

import ml_collections

from jaxclr import config as config_lib, errors
from jaxclr.config import legacy
from jaxclr.training import workdir_lock

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"

# Fields that may change between a run and its resumption without changing
# what the finished steps computed: schedule length, cadence, paths.
RESUMABLE_CHANGES = frozenset({
    "num_train_steps", "log_every_steps", "checkpoint_every_steps",
    "max_checkpoints_to_keep", "eval_every_steps", "data_dir",
    "allow_config_mismatch", "nonfinite_policy", "allow_eval_on_train",
    "model.remat", "model.conv_kernel_grad", "model.conv_library",
})
# Fields a saved config.json may hold that the schemas no longer have, with
# the value that computes what today's code does (the test-only NaN hook,
# off): not a difference at that value.
REMOVED_FIELDS = {"debug_inject_nan_at_step": -1}


WorkdirError = errors.WorkdirError


def flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_differences(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for every field that differs and may not change.

  A field the saved config lacks but the new one holds at its schema default
  (the schema of the new config's job) is not a difference: it was added to
  jaxclr after the run started, and a new field's default keeps the
  behaviour the run was started with. Nor is a field of REMOVED_FIELDS that
  the saved config holds at its listed value.
  """
  a, b = flatten(old), flatten(new)
  # A config dict without 'job' (older than the field) is a pretraining one.
  defaults = flatten(config_to_dict(config_lib.job_schema(
      new.get("job", "pretrain"))))
  # The sections of the methods the run does not train change nothing.
  unused = set()
  if old.get("method") == new.get("method"):
    unused = set(config_lib.method_section_names()) - {new.get("method")}
  diffs = []
  for key in sorted(set(a) | set(b)):
    if key in RESUMABLE_CHANGES or key.split(".")[0] in RESUMABLE_CHANGES:
      continue
    if key.split(".")[0] in unused:
      continue
    if key not in a and key in defaults and b.get(key) == defaults[key]:
      continue
    if key not in b and key in REMOVED_FIELDS and a[key] == REMOVED_FIELDS[key]:
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return diffs


def load_config(workdir: str) -> dict | None:
  """The workdir's saved config.json as a dict (a pretraining one in
  today's layout: config/legacy.py), or None."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    raw = json.load(f)
  if raw.get("job", "pretrain") == "pretrain":
    return legacy.upgrade(raw)
  return raw


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def checkpoint_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps in workdir (names of checkpoints/<step>/)."""
  root = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(root):
    return []
  return sorted(int(n) for n in os.listdir(root)
                if n.isdigit() and os.path.isdir(os.path.join(root, n)))


def require_pretraining_workdir(path: str | None) -> dict:
  """Checks that `path` is a jaxclr pretraining workdir with a checkpoint.

  For jobs that read one (linear evaluation). Returns its config as a dict.

  Raises:
    WorkdirError naming the path and what is missing.
  """
  if not path:
    raise WorkdirError("No pretraining workdir given; pass the --workdir of "
                       "a `python -m jaxclr.main` run")
  if not os.path.isdir(path):
    raise WorkdirError(f"Pretraining workdir {path!r} does not exist")
  config = load_config(path)
  if config is None:
    raise WorkdirError(
        f"{path!r} is not a jaxclr pretraining workdir: it has no "
        f"{CONFIG_FILE} (expected {CONFIG_FILE}, {CHECKPOINT_DIR}/<step>/)")
  if not checkpoint_steps(path):
    raise WorkdirError(f"Pretraining workdir {path!r} has no checkpoint yet "
                       f"(nothing in {os.path.join(path, CHECKPOINT_DIR)})")
  return config


def _check_writable(workdir: str):
  """Creates and removes a file: os.access says yes to root on read-only
  mounts and to anyone on some network filesystems."""
  probe = os.path.join(workdir, f".jaxclr_write_test.{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"Workdir {workdir!r} is not writable: "
                       f"{e.strerror}") from None


# How long the other processes wait for process 0 to take the lock: it
# may still be opening a large dataset.
LOCK_SHARE_TIMEOUT_S = 1800


def _lock(workdir: str, is_primary: bool) -> None:
  """The workdir lock, taken by process 0; every process raises its
  refusal (the others learn it through the coordination service)."""
  error = None
  if is_primary:
    try:
      workdir_lock.acquire(workdir)
    except WorkdirError as e:
      error = e
  from jaxclr.parallel import distributed  # pylint: disable=g-import-not-at-top
  refusal = distributed.share_from_primary(
      f"workdir_lock/{os.path.abspath(workdir)}",
      None if error is None else str(error), LOCK_SHARE_TIMEOUT_S)
  if error is not None:
    raise error
  if refusal:
    raise errors.WorkdirBusy(refusal)


def check_path(workdir: str) -> None:
  """Refuses a workdir that cannot be one, without creating anything: a URL,
  or a path below (or at) an existing file. Jobs call it before opening
  their data, so the refusal comes first and costs nothing."""
  if "://" in workdir:  # os.makedirs would make a local 'gs:' directory.
    raise WorkdirError(
        f"workdir={workdir!r} is a URL; jaxclr writes config.json and "
        "metrics.jsonl with local file I/O, so mount the bucket (e.g. "
        "gcsfuse) and pass the mounted path")
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      return
    path = parent
  if not os.path.isdir(path):
    raise WorkdirError(f"Cannot create workdir {workdir!r}: {path!r} is a "
                       "file, not a directory")


def prepare(workdir: str, config: ml_collections.ConfigDict, *,
            is_primary: bool) -> None:
  """Creates the workdir, or checks that its existing config matches.

  Process 0 takes the workdir's lock first (workdir_lock.py): a workdir in
  use by another live job is refused (errors.WorkdirBusy) before anything
  is written into it; one left locked by a dead job is taken over.

  The config.json of a run with checkpoints is never overwritten: resuming
  it with a changed config (outside RESUMABLE_CHANGES) is refused, listing
  the differences, unless config.allow_config_mismatch is set, in which case
  the new config is written beside it as config.<n>.json. A workdir without
  checkpoints (a run that failed before its first save) takes the new config.
  """
  check_path(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"Cannot create workdir {workdir!r}: {e.strerror}") from None
  if not os.path.isdir(workdir):
    raise WorkdirError(f"Workdir {workdir!r} is not a directory")
  _lock(workdir, is_primary)
  if is_primary:
    _check_writable(workdir)
  new = config_to_dict(config)
  old = load_config(workdir) if checkpoint_steps(workdir) else None
  if old is not None:
    diffs = config_differences(old, new)
    if diffs and not config.allow_config_mismatch:
      raise WorkdirError(
          f"Workdir {workdir!r} holds a run with a different config; "
          f"refusing to resume it ({len(diffs)} difference(s), saved -> "
          "now): " + "; ".join(diffs) + ". Use another --workdir, or pass "
          "--config.allow_config_mismatch=True to resume anyway.")
    if not is_primary:
      return
    if diffs:
      n = 1
      while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
        n += 1
      path = os.path.join(workdir, f"config.{n}.json")
    else:
      path = os.path.join(workdir, "config.resumed.json")
  else:
    if not is_primary:
      return
    path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(new, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
