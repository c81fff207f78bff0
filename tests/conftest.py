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


@pytest.fixture(scope="module")
def fast_compiles():
  """XLA's optimization passes are most of a small test's time and no property checked with it
  depends on them (the same programs compare with each other): off for the module, restored
  afterwards. Use with ``pytestmark = pytest.mark.usefixtures("fast_compiles")``."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
