"""The pretraining methods, registered by name (docs/methods.md).

`python -m jaxclr.main --config ... --config.method=NAME` trains the
registered method NAME with its config section `config.NAME`. The built-in
methods are listed here explicitly; `register` adds one from outside jaxclr
(a user's module, a test) before its config is built, and nothing
registers on import. Validation, the pretraining job, the CLI's errors and
the docs table all read `names()` / `get()`.
"""

from __future__ import annotations

from jaxclr.methods import (barlow_twins, byol, dino, mocov2, mocov3, nnclr,
                            simclr, simsiam, swav, vicreg)
from jaxclr.methods.base import Method, Setup  # pylint: disable=unused-import

_BUILTIN = (simclr.SimCLR(), simclr.SupCon(), byol.BYOL(), nnclr.NNCLR(),
            barlow_twins.BarlowTwins(), vicreg.VICReg(), simsiam.SimSiam(),
            mocov2.MoCoV2(), mocov3.MoCoV3(), dino.DINO(), swav.SwAV())
_REGISTRY: dict[str, Method] = {m.name: m for m in _BUILTIN}


def names() -> tuple[str, ...]:
  """Every registered method's name, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> Method:
  """The method called `name`; ValueError listing the registered ones."""
  if name not in _REGISTRY:
    raise ValueError(f"method={name!r} is unknown; valid: "
                     f"{', '.join(names())}")
  return _REGISTRY[name]


def registered() -> tuple[Method, ...]:
  return tuple(_REGISTRY.values())


def register(method: Method) -> Method:
  """Adds `method` to the registry; build configs after this, since the
  pretraining schema gets a section per registered method."""
  name = method.name
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"cannot register method {name!r}: its name must be an "
                     "identifier (it names its config section)")
  if name in _REGISTRY:
    raise ValueError(f"cannot register method {name!r}: the name is taken "
                     f"(registered: {', '.join(names())})")
  _REGISTRY[name] = method
  return method


def unregister(name: str) -> None:
  """Removes a method added by `register` (the built-in ones stay)."""
  if any(m.name == name for m in _BUILTIN):
    raise ValueError(f"method {name!r} is built in")
  _REGISTRY.pop(name, None)
