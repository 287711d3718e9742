"""jaxclr: SimCLR pretraining and evaluation in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy, so that `import jaxclr` stays free of jax/TensorFlow imports.
  if name == "load_encoder":
    from jaxclr.jobs.export import (  # pylint: disable=g-import-not-at-top
        load_encoder)
    return load_encoder
  raise AttributeError(f"module 'jaxclr' has no attribute {name!r}")
