"""The primitive config checks every validation rule is written with: each
raises one ConfigError line that names the bad value and what is valid."""

from __future__ import annotations

from jaxclr import errors


def check(ok: bool, message: str):
  if not ok:
    raise errors.ConfigError(message)


def positive(name: str, value):
  check(value > 0, f"{name}={value!r} must be > 0")


def non_negative(name: str, value):
  check(value >= 0, f"{name}={value!r} must be >= 0")


def probability(name: str, value):
  check(0.0 <= value <= 1.0,
        f"{name}={value!r} must be a probability in [0, 1]")


def in_range(name: str, value, lo: float, hi: float):
  check(len(value) == 2 and lo <= value[0] <= value[1] <= hi,
        f"{name}={tuple(value)!r} must be (min, max) with "
        f"{lo} <= min <= max <= {hi}")
