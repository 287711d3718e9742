"""jaxclr/cpu/python_ffi.py: XLA FFI targets with Python handlers (CPU),
and the FFI version they answer and accept."""

import ctypes
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclr.cpu import python_ffi, versions

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


def test_structs_version_is_the_installed_headers_on_the_tested_jaxlib():
  """STRUCTS_VERSION is read off c_api.h of the jaxlib the structs were
  checked on; on that jaxlib its header must say so."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  header = os.path.join(os.path.dirname(jaxlib.__file__), "include", "xla",
                        "ffi", "api", "c_api.h")
  if versions.untested("jaxlib") or not os.path.exists(header):
    pytest.skip("not the tested jaxlib, or it ships no headers")
  with open(header) as f:
    defines = dict(re.findall(r"#define (XLA_FFI_API_M\w+) (\d+)", f.read()))
  assert (int(defines["XLA_FFI_API_MAJOR"]),
          int(defines["XLA_FFI_API_MINOR"])) == python_ffi.STRUCTS_VERSION


@pytest.mark.parametrize("runtime,refused", [
    ((0, 3), False), ((0, 4), False), ((0, 9), False),
    ((0, 2), True), ((0, 0), True), ((1, 3), True), ((1, 0), True)])
def test_refuses_another_major_or_an_older_minor(runtime, refused):
  assert python_ffi.STRUCTS_VERSION == (0, 3)
  assert (python_ffi.refusal(runtime) is not None) is refused


def _metadata_query(runtime_version):
  """Calls a handler as XLA's registration does, through a fake API of
  `runtime_version` (None: no API); returns (the handler's error message or
  None, the version it answered)."""
  errors_made = []

  @python_ffi._ErrorCreate
  def error_create(args):
    errors_made.append(args.contents.message.decode())
    return 1  # An opaque non-null XLA_FFI_Error*.

  metadata = python_ffi._Metadata(ctypes.sizeof(python_ffi._Metadata))
  extension = python_ffi._MetadataExtension(
      python_ffi._ExtensionBase(ctypes.sizeof(python_ffi._MetadataExtension),
                                python_ffi._EXTENSION_METADATA, None),
      ctypes.pointer(metadata))
  frame = python_ffi._CallFrame(ctypes.sizeof(python_ffi._CallFrame))
  frame.extension_start = ctypes.cast(
      ctypes.pointer(extension), ctypes.POINTER(python_ffi._ExtensionBase))
  if runtime_version is not None:
    api = python_ffi._Api(ctypes.sizeof(python_ffi._Api), None,
                          python_ffi._ApiVersion(
                              ctypes.sizeof(python_ffi._ApiVersion), None,
                              *runtime_version),
                          None, error_create)
    frame.api = ctypes.pointer(api)
  handler = python_ffi._handler_pointer("jaxclr_test_query", _affine)
  returned = handler(ctypes.pointer(frame))
  assert bool(returned) == bool(errors_made)
  answered = (metadata.api_version.major_version,
              metadata.api_version.minor_version)
  return (errors_made[0] if errors_made else None), answered


@pytest.mark.parametrize("runtime", [(0, 3), (0, 7), None])
def test_answers_the_structs_version_not_the_runtimes(runtime):
  error, answered = _metadata_query(runtime)
  assert error is None
  assert answered == python_ffi.STRUCTS_VERSION


@pytest.mark.parametrize("runtime", [(0, 2), (1, 3)])
def test_refuses_a_runtime_the_structs_do_not_fit(runtime):
  error, answered = _metadata_query(runtime)
  assert error == (f"XLA's FFI API is version {runtime[0]}.{runtime[1]}; "
                   "jaxclr's Python FFI handlers (jaxclr/cpu/python_ffi.py) "
                   "are written against 0.3 and run on 0.3 to 0.x")
  assert answered == (0, 0)  # Nothing answered.


@pytest.mark.parametrize("runtime", [(1, 0), (0, 2)])
def test_registration_on_an_unfit_runtime_is_a_clear_error(monkeypatch,
                                                           runtime):
  """The real registration, the runtime's version faked where the handler
  reads it: refused with FfiVersionError, and the process goes on."""
  monkeypatch.setattr(python_ffi, "_runtime_version", lambda frame: runtime)
  with pytest.raises(python_ffi.FfiVersionError,
                     match=r"FFI target 'jaxclr_test_unfit' not registered: "
                     rf".*XLA's FFI API is version {runtime[0]}\.{runtime[1]}"):
    python_ffi.register("jaxclr_test_unfit", _affine)
  assert "jaxclr_test_unfit" not in python_ffi._REGISTERED
  monkeypatch.undo()
  y, _ = jax.jit(lambda x: _call_affine(x, jnp.ones((1, 2), jnp.int32), 2.0,
                                        1, "t"))(jnp.arange(2.0))
  np.testing.assert_array_equal(y, [1.0, 3.0])
