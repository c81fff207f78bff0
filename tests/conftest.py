import jax
import pytest


@pytest.fixture
def x64():
  """Runs a test with float64 enabled, restoring the previous setting afterwards.

  Defined here (not taken from the lab's runner) so that the library's tests need no lab module.
  """
  if hasattr(jax, "enable_x64"):
    with jax.enable_x64(True):
      yield
    return
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", old)
