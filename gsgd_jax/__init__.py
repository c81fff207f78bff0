"""gsgd_jax: G-SGD (Meng et al., ICLR 2019) for JAX/Flax/Optax.

Optimization of ReLU networks in their positively scale-invariant space (G-space): the basis-path
structure of a network (skeleton weights, basis paths), the inverse chain rule and the exact
weight allocation as composable optax transformations.
"""

from gsgd_jax.pathspace import allocate as allocate
from gsgd_jax.pathspace import basis_path_values as basis_path_values
from gsgd_jax.pathspace import path_gradients as path_gradients
from gsgd_jax.structure import BasisPathStructure as BasisPathStructure
from gsgd_jax.structure import Chain as Chain
from gsgd_jax.structure import Layer as Layer
from gsgd_jax._tree import StackIndex as StackIndex
from gsgd_jax.skeleton import align_skeleton as align_skeleton
from gsgd_jax.gauge import basis_path_mask as basis_path_mask
from gsgd_jax.builders import chain_structure as chain_structure
from gsgd_jax.builders import infer_structure as infer_structure
from gsgd_jax.gauge import random_rescale as random_rescale
from gsgd_jax.gauge import rescale as rescale
from gsgd_jax.gauge import reset_skeleton as reset_skeleton
from gsgd_jax.gauge import skeleton_mask as skeleton_mask
from gsgd_jax.tracing import trace_nnx_structure as trace_nnx_structure
from gsgd_jax.tracing import trace_report as trace_report
from gsgd_jax.tracing import trace_structure as trace_structure
from gsgd_jax.pathspace import path_scales as path_scales
from gsgd_jax.transform import PathSpaceState as PathSpaceState
from gsgd_jax.transform import allocate_path_updates as allocate_path_updates
from gsgd_jax.transform import check_gradients as check_gradients
from gsgd_jax.transform import check_params as check_params
from gsgd_jax.transform import g_space as g_space
from gsgd_jax.transform import gsgd as gsgd
from gsgd_jax.transform import gsgd_adam as gsgd_adam
from gsgd_jax.transform import to_path_gradients as to_path_gradients
from gsgd_jax.verify import verify_structure as verify_structure
from gsgd_jax._warnings import GSpaceWarning as GSpaceWarning
from gsgd_jax.coordinates import PAPER as PAPER
from gsgd_jax.coordinates import PathCoordinates as PathCoordinates

__version__ = "0.2.0"

__all__ = [
    "BasisPathStructure",
    "Chain",
    "GSpaceWarning",
    "PAPER",
    "PathCoordinates",
    "PathSpaceState",
    "Layer",
    "StackIndex",
    "align_skeleton",
    "allocate",
    "allocate_path_updates",
    "basis_path_mask",
    "basis_path_values",
    "chain_structure",
    "check_gradients",
    "check_params",
    "g_space",
    "gsgd",
    "gsgd_adam",
    "infer_structure",
    "path_gradients",
    "path_scales",
    "random_rescale",
    "rescale",
    "reset_skeleton",
    "skeleton_mask",
    "to_path_gradients",
    "trace_nnx_structure",
    "trace_report",
    "trace_structure",
    "verify_structure",
]


_REMOVED = {
    "GSpaceState": "g_space's state is now optax.chain's tuple (PathSpaceState, inner state, "
                   "PathSpaceState); the per-chain scale is PathSpaceState.path_scale",
}


def __getattr__(name):
  if name in _REMOVED:
    raise AttributeError(f"gsgd_jax.{name} was removed in gsgd_jax 0.2: {_REMOVED[name]}. See "
                         "CHANGELOG.md.")
  raise AttributeError(f"module 'gsgd_jax' has no attribute {name!r}")
