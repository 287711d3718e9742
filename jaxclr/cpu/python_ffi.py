"""CPU custom calls written in Python: an XLA FFI target whose handler is a
Python function that reads its operands and writes its results in place.

Why not `jax.pure_callback`: on the CPU it copies every operand twice
before the callback sees it (jaxlib's callback handler copies XLA's buffer
into a new NumPy array, then pure_callback `device_put`s that array, which
is not 64-byte aligned and so is copied again) and copies each result into
XLA's buffer after it returns. For the oneDNN convolutions
(jaxclr/cpu/onednn_conv.py) those copies of 100+ MB activations, and
the page faults of the fresh memory they land in, took a quarter of each
call: measured on the 2-core CPU, a 3x3, 64-channel layer at N=512, forward
245 ms through pure_callback against 187 ms here, both gradients 457
against 381 ms (`python -m benchmarks.conv_layers --n 512`;
benchmarks/RESULTS.md, "CPU speed, 2026-12-05 (late)").
jax registers FFI targets from a function pointer (`jax.ffi.pycapsule`)
and offers no way to write one in Python, so this module builds the
pointer with ctypes over the FFI's C ABI: the structs below mirror
xla/ffi/api/c_api.h as jaxlib 0.10.2 ships it (jaxlib/include/xla/ffi/
api/c_api.h in its wheel), which declares XLA_FFI_API_MAJOR 0 and
XLA_FFI_API_MINOR 3: STRUCTS_VERSION. A versioned ABI whose structs only
grow at their end within a major version: XLA takes a handler that answers
its metadata query with a version from its oldest supported one up to its
own (openxla/xla, xla/ffi/ffi_registry.cc: IsSupportedApiVersion), so the
handler answers with STRUCTS_VERSION -- the version it was written against
and checked on, not the runtime's -- and refuses a runtime of another major
version, or an older minor one, with FfiVersionError at registration.

A handler is `fn(inputs, outputs, attrs)`: NumPy views of the operands'
and results' buffers (the operands are XLA's, valid for the call only: do
not keep references to them, and do not write to them), and the call's
attributes as a dict of Python scalars. It must fill every output. An
exception becomes the custom call's error, "<target>: <type>: <message>"
(its traceback goes to the INFO log), so the jitted function raises
instead of returning garbage.
The handler runs on one of XLA's threads and takes the GIL.

The target is named in the compiled program, not addressed, so JAX's
persistent compilation cache can reuse a step that calls it from another
process once the same target is registered there.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any, Callable

from absl import logging
import jax
import numpy as np

Handler = Callable[[list, list, dict], None]

# xla/ffi/api/c_api.h, with the names it gives them.
_EXTENSION_METADATA = 1
_STAGE_EXECUTE = 3
_ERROR_INVALID_ARGUMENT = 3
_ERROR_FAILED_PRECONDITION = 9
_ERROR_INTERNAL = 13
_ATTR_SCALAR, _ATTR_STRING = 3, 4
# (XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR) of the c_api.h the structs below
# were written against and tested on: jaxlib 0.10.2's (module docstring).
STRUCTS_VERSION = (0, 3)

# XLA_FFI_DataType -> NumPy dtype (the ones a handler here may see).
_DTYPES = {1: np.dtype(bool), 2: np.dtype(np.int8), 3: np.dtype(np.int16),
           4: np.dtype(np.int32), 5: np.dtype(np.int64),
           6: np.dtype(np.uint8), 7: np.dtype(np.uint16),
           8: np.dtype(np.uint32), 9: np.dtype(np.uint64),
           10: np.dtype(np.float16), 11: np.dtype(np.float32),
           12: np.dtype(np.float64)}


class _ExtensionBase(ctypes.Structure):
  pass


_ExtensionBase._fields_ = [  # pylint: disable=protected-access
    ("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
    ("next", ctypes.POINTER(_ExtensionBase))]


class _ApiVersion(ctypes.Structure):
  _fields_ = [("struct_size", ctypes.c_size_t),
              ("extension_start", ctypes.c_void_p),
              ("major_version", ctypes.c_int),
              ("minor_version", ctypes.c_int)]


class _ErrorCreateArgs(ctypes.Structure):
  _fields_ = [("struct_size", ctypes.c_size_t),
              ("extension_start", ctypes.c_void_p),
              ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


_ErrorCreate = ctypes.CFUNCTYPE(ctypes.c_void_p,
                                ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):
  # The leading fields of XLA_FFI_Api; the function table goes on after
  # XLA_FFI_Error_Create, which is all a handler here calls.
  _fields_ = [("struct_size", ctypes.c_size_t),
              ("extension_start", ctypes.c_void_p),
              ("api_version", _ApiVersion),
              ("internal_api", ctypes.c_void_p),
              ("error_create", _ErrorCreate)]


class _Metadata(ctypes.Structure):
  _fields_ = [("struct_size", ctypes.c_size_t),
              ("api_version", _ApiVersion),
              ("traits", ctypes.c_uint32),
              ("state_type_id", ctypes.c_int64)]


class _MetadataExtension(ctypes.Structure):
  _fields_ = [("extension_base", _ExtensionBase),
              ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
  _fields_ = [("struct_size", ctypes.c_size_t),
              ("extension_start", ctypes.c_void_p),
              ("dtype", ctypes.c_int), ("data", ctypes.c_void_p),
              ("rank", ctypes.c_int64),
              ("dims", ctypes.POINTER(ctypes.c_int64))]


class _Buffers(ctypes.Structure):
  # XLA_FFI_Args and XLA_FFI_Rets have the same layout.
  _fields_ = [("struct_size", ctypes.c_size_t),
              ("extension_start", ctypes.c_void_p),
              ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
              ("buffers", ctypes.POINTER(ctypes.c_void_p))]


class _ByteSpan(ctypes.Structure):
  _fields_ = [("ptr", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Scalar(ctypes.Structure):
  _fields_ = [("dtype", ctypes.c_int), ("value", ctypes.c_void_p)]


class _Attrs(ctypes.Structure):
  _fields_ = [("struct_size", ctypes.c_size_t),
              ("extension_start", ctypes.c_void_p),
              ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
              ("names", ctypes.POINTER(ctypes.POINTER(_ByteSpan))),
              ("attrs", ctypes.POINTER(ctypes.c_void_p))]


class _CallFrame(ctypes.Structure):
  _fields_ = [("struct_size", ctypes.c_size_t),
              ("extension_start", ctypes.POINTER(_ExtensionBase)),
              ("api", ctypes.POINTER(_Api)), ("ctx", ctypes.c_void_p),
              ("stage", ctypes.c_int), ("args", _Buffers), ("rets", _Buffers),
              ("attrs", _Attrs), ("future", ctypes.c_void_p)]


_HandlerPointer = ctypes.CFUNCTYPE(ctypes.c_void_p,
                                   ctypes.POINTER(_CallFrame))


class FfiVersionError(RuntimeError):
  """XLA's FFI runtime is not one the structs here were written for."""


class _FfiError(Exception):
  def __init__(self, message: str, code: int = _ERROR_INVALID_ARGUMENT):
    super().__init__(message)
    self.code = code


def _array(buffer_pointer) -> np.ndarray:
  """A NumPy view of an XLA_FFI_Buffer, without copying."""
  buffer = ctypes.cast(buffer_pointer, ctypes.POINTER(_Buffer)).contents
  if buffer.dtype not in _DTYPES:
    raise _FfiError(f"buffer of XLA data type {buffer.dtype}: handlers "
                    f"written in Python take {sorted(_DTYPES)} "
                    "(xla/ffi/api/c_api.h's XLA_FFI_DataType)")
  dtype = _DTYPES[buffer.dtype]
  shape = tuple(buffer.dims[i] for i in range(buffer.rank))
  nbytes = math.prod(shape) * dtype.itemsize
  if nbytes == 0:
    return np.empty(shape, dtype)
  memory = (ctypes.c_char * nbytes).from_address(buffer.data)
  return np.frombuffer(memory, dtype).reshape(shape)


def _buffers(buffers: _Buffers) -> list[np.ndarray]:
  return [_array(buffers.buffers[i]) for i in range(buffers.size)]


def _attributes(attrs: _Attrs) -> dict[str, Any]:
  out = {}
  for i in range(attrs.size):
    span = attrs.names[i].contents
    name = ctypes.string_at(span.ptr, span.len).decode()
    if attrs.types[i] == _ATTR_STRING:
      value = ctypes.cast(attrs.attrs[i], ctypes.POINTER(_ByteSpan)).contents
      out[name] = ctypes.string_at(value.ptr, value.len).decode()
    elif attrs.types[i] == _ATTR_SCALAR:
      scalar = ctypes.cast(attrs.attrs[i], ctypes.POINTER(_Scalar)).contents
      if scalar.dtype not in _DTYPES:
        raise _FfiError(f"attribute {name!r} of XLA data type "
                        f"{scalar.dtype} is not supported")
      ctype = np.ctypeslib.as_ctypes_type(_DTYPES[scalar.dtype])
      out[name] = ctypes.cast(scalar.value,
                              ctypes.POINTER(ctype)).contents.value
    else:
      raise _FfiError(f"attribute {name!r}: handlers written in Python take "
                      "scalar and string attributes only")
  return out


def _error(api, message: str, code: int):
  args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None,
                          message.encode(errors="replace"), code)
  return api.contents.error_create(ctypes.byref(args))


def refusal(runtime_version: tuple[int, int]) -> str | None:
  """Why the handlers here cannot run on an FFI runtime of this (major,
  minor) version, or None: another major version may have moved any field;
  an older minor one may lack fields the structs here have."""
  major, minor = runtime_version
  want_major, want_minor = STRUCTS_VERSION
  if major == want_major and minor >= want_minor:
    return None
  return (f"XLA's FFI API is version {major}.{minor}; jaxclr's Python FFI "
          f"handlers (jaxclr/cpu/python_ffi.py) are written against "
          f"{want_major}.{want_minor} and run on {want_major}.{want_minor} "
          f"to {want_major}.x")


def _runtime_version(call_frame: _CallFrame) -> tuple[int, int] | None:
  """The (major, minor) version of the runtime calling, None where it
  passes no API (older XLA's metadata query did not)."""
  if not call_frame.api:
    return None
  version = call_frame.api.contents.api_version
  return version.major_version, version.minor_version


def _metadata(call_frame: _CallFrame):
  """Answers XLA's registration-time query for the handler's FFI version
  and traits: STRUCTS_VERSION, the version the structs were written
  against (XLA refuses it if it no longer supports it), after refusing a
  runtime they do not fit."""
  runtime = _runtime_version(call_frame)
  why = None if runtime is None else refusal(runtime)
  if why is not None:
    return _error(call_frame.api, why, _ERROR_FAILED_PRECONDITION)
  extension = ctypes.cast(call_frame.extension_start,
                          ctypes.POINTER(_MetadataExtension)).contents
  metadata = extension.metadata.contents
  metadata.api_version = _ApiVersion(ctypes.sizeof(_ApiVersion), None,
                                     *STRUCTS_VERSION)
  metadata.traits = 0
  return None


def _handler_pointer(name: str, fn: Handler):
  def handle(call_frame_pointer):
    call_frame = call_frame_pointer.contents
    try:
      extension = call_frame.extension_start
      if extension and extension.contents.type == _EXTENSION_METADATA:
        return _metadata(call_frame)
      if call_frame.stage != _STAGE_EXECUTE:
        raise _FfiError(f"called at execution stage {call_frame.stage}; "
                        f"registered for {_STAGE_EXECUTE} (execute) only")
      fn(_buffers(call_frame.args), _buffers(call_frame.rets),
         _attributes(call_frame.attrs))
      return None
    except _FfiError as e:
      return _error(call_frame.api, f"{name}: {e}", e.code)
    except BaseException as e:  # pylint: disable=broad-except
      # Returned to XLA as the call's error: jax raises it where the
      # result is waited for, and the job's edge reports it in one line
      # (jaxclr/cpu/__init__.py: describe_failure). The traceback exists
      # only here: to the log, at INFO.
      logging.info("FFI target %s failed", name, exc_info=True)
      if not call_frame.api:  # Nothing to report the error through.
        return None
      return _error(call_frame.api, f"{name}: {type(e).__name__}: {e}",
                    _ERROR_INTERNAL)
  return _HandlerPointer(handle)


# One entry per registered target, for the life of the process, as in XLA's
# own registry: the ctypes function must outlive every program calling it.
_REGISTERED: dict[str, tuple[Handler, Any]] = {}


def register(name: str, fn: Handler) -> None:
  """Registers `fn` as the CPU FFI target `name`. Registering the same
  function under the same name again does nothing; another function under
  a registered name is refused (ValueError), and so is an FFI runtime the
  structs here do not fit (FfiVersionError)."""
  if name in _REGISTERED:
    if _REGISTERED[name][0] is not fn:
      raise ValueError(f"FFI target {name!r} is already registered to "
                       f"{_REGISTERED[name][0]!r}")
    return
  pointer = _handler_pointer(name, fn)
  # With the CPU backend started, XLA queries the handler's version now and
  # a refusal raises here; registered before, the query runs when the
  # backend starts, and a refusal there fails the backend itself.
  jax.devices("cpu")
  try:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(pointer),
                                platform="cpu")
  except jax.errors.JaxRuntimeError as e:
    if "FFI API" not in str(e) and "API version" not in str(e):
      raise
    raise FfiVersionError(f"FFI target {name!r} not registered: "
                          f"{' '.join(str(e).split())}") from e
  _REGISTERED[name] = (fn, pointer)
