"""The category of the library's own notes, so that users (and the test suite) can filter them."""


class GSpaceWarning(UserWarning):
  """A note from gsgd_jax: what a transform inferred or left outside G-space, a tiny skeleton
  path, a JAX version the sharding workaround was not verified on. Filter it with
  ``warnings.filterwarnings("ignore", category=gsgd_jax.GSpaceWarning)``; the test suite turns it
  into an error except where a test expects one."""
