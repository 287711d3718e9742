"""The training core every job runs on: the loop (loop.py), the state and
its update (state.py, update.py), optimizers and schedules (optim.py), the
checkpoint store (checkpoint.py), the workdir (workdir.py), metrics
(metrics.py)."""
