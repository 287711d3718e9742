"""The ResNets' 2-D convolution (NHWC / HWIO) as XLA computes it, and the
type every convolution the models take has.

A model receives its convolution once, from the job that builds it
(`conv=` of models.simclr.build_encoder / build_model); XLA's is the
default everywhere. A one-device CPU job may pass a faster one that
jaxclr/cpu provides (jaxclr/cpu/__init__.py: `job_convolution`); every
form computes the same convolution to float32 round-off.
"""

from __future__ import annotations

from typing import Callable

from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]
# conv(x [N, H, W, Cin], kernel [kh, kw, Cin, Cout], strides, padding).
ConvFn = Callable[..., object]
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv2d(x, kernel, strides: int, padding: Padding):
  """conv(x, kernel) with explicit (low, high) padding per spatial dim."""
  return lax.conv_general_dilated(x, kernel, (strides, strides), padding,
                                  dimension_numbers=_DIMENSIONS)
