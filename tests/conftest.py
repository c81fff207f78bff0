import pytest

from gsgd_jax.experiments import _precision


@pytest.fixture
def x64():
  """Runs a test with float64 enabled, restoring the previous setting afterwards."""
  with _precision("float64"):
    yield
