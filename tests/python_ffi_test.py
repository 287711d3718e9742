"""jaxclr/cpu/python_ffi.py: XLA FFI targets with Python handlers (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclr.cpu import python_ffi

_SEEN = {}


def _affine(inputs, outputs, attrs):
  """outputs = (scale * x + shift, column sums of n); records what it saw."""
  x, n = inputs
  _SEEN["pointer"] = x.ctypes.data
  _SEEN["attrs"] = dict(attrs)
  outputs[0][...] = attrs["scale"] * x + attrs["shift"]
  outputs[1][...] = n.sum(axis=0)


def _call_affine(x, n, scale, shift, tag):
  python_ffi.register("jaxclr_test_affine", _affine)
  return jax.ffi.ffi_call(
      "jaxclr_test_affine",
      (jax.ShapeDtypeStruct(x.shape, x.dtype),
       jax.ShapeDtypeStruct(n.shape[1:], n.dtype)))(
           x, n, scale=np.float64(scale), shift=np.int64(shift), tag=tag)


def test_handler_computes_in_place_with_its_attributes():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((5, 7)).astype(np.float32))
  n = jnp.asarray(rng.integers(-9, 9, (4, 3)).astype(np.int32))
  fn = jax.jit(lambda x, n: _call_affine(x, n, 1.5, -2, "hello"))
  y, sums = fn(x, n)
  np.testing.assert_array_equal(
      y, np.float32(1.5) * np.asarray(x) + np.float32(-2))
  np.testing.assert_array_equal(sums, np.asarray(n).sum(axis=0))
  assert sums.dtype == jnp.int32
  assert _SEEN["attrs"] == {"scale": 1.5, "shift": -2, "tag": "hello"}
  # The handler read the argument's own buffer: no copy on the way in.
  assert _SEEN["pointer"] == x.unsafe_buffer_pointer()


def test_handler_inside_a_larger_program_and_its_gradient_path():
  """A target between XLA operations, called twice in one program."""
  x = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4)
  n = jnp.ones((2, 4), jnp.int32)

  def program(x):
    y, _ = _call_affine(jnp.sin(x), n, 2.0, 1, "a")
    z, _ = _call_affine(y * y, n, 0.5, 0, "b")
    return z.sum()

  expected = (0.5 * (2.0 * np.sin(np.asarray(x, np.float64)) + 1) ** 2).sum()
  np.testing.assert_allclose(jax.jit(program)(x), expected, rtol=1e-6)


def test_an_exception_in_the_handler_is_the_call_error():
  def failing(inputs, outputs, attrs):
    del inputs, outputs
    raise ValueError(f"no good: {attrs['code']}")

  python_ffi.register("jaxclr_test_failing", failing)
  fn = jax.jit(lambda x: jax.ffi.ffi_call(
      "jaxclr_test_failing", jax.ShapeDtypeStruct(x.shape, x.dtype))(
          x, code=np.int64(42)))
  with pytest.raises(Exception, match="jaxclr_test_failing: ValueError: "
                     "no good: 42"):
    jax.block_until_ready(fn(jnp.ones(3)))
  # The process goes on: another call of a working target still runs.
  y, _ = jax.jit(lambda x: _call_affine(x, jnp.ones((1, 2), jnp.int32), 1.0,
                                        0, "t"))(jnp.arange(2.0))
  np.testing.assert_array_equal(y, [0.0, 1.0])


def test_unsupported_buffer_type_is_a_clear_error():
  python_ffi.register("jaxclr_test_affine", _affine)
  x = jnp.ones((2, 2), jnp.bfloat16)
  fn = jax.jit(lambda x: jax.ffi.ffi_call(
      "jaxclr_test_affine", (jax.ShapeDtypeStruct(x.shape, x.dtype),
                             jax.ShapeDtypeStruct((2,), x.dtype)))(
                                 x, x, scale=np.float64(1), shift=np.int64(0),
                                 tag="x"))
  with pytest.raises(Exception, match="XLA data type 16"):
    jax.block_until_ready(fn(x))


def test_registration_is_idempotent_and_names_are_not_reused():
  python_ffi.register("jaxclr_test_affine", _affine)
  python_ffi.register("jaxclr_test_affine", _affine)
  with pytest.raises(ValueError, match="jaxclr_test_affine"):
    python_ffi.register("jaxclr_test_affine", lambda i, o, a: None)
