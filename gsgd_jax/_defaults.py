"""Default values shared by several modules (no imports, so any module can use them)."""

MIN_RATIO = 0.1
"""Default skeleton-path guard: the ratio ``R = v'/v`` of each skeleton-only path is clipped to
``[MIN_RATIO, 1 / MIN_RATIO]`` in one step (``min_ratio`` of :func:`gsgd_jax.gsgd`,
:func:`gsgd_jax.g_space`, :func:`gsgd_jax.allocate_path_updates` and
:func:`gsgd_jax.pathspace.allocate`)."""
