"""The aligned skeleton and the normalized path coordinates (issue 9).

The maths of both is checked against brute-force path enumeration in test_core_math.py and
test_conv_math.py (their structures are aligned by default); here: that the skeleton choice is
itself invariant, that it fixes the tiny skeleton paths of a He-initialized network, and the
properties of the path scales.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsgd_jax
from gsgd_jax import pathspace
import nets as models
from nets import mlp_apply, mlp_params
from test_conv_math import MODELS, _runner, _setup
from test_core_math import WIDTHS

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.mark.parametrize("name", ["equal", "growing", "shrinking", "mixed", "wide_jumps"])
def test_aligned_skeleton_is_a_real_choice_and_invariant(x64, name):
  params = mlp_params(WIDTHS[name], bias=True)
  s = gsgd_jax.infer_structure(params)
  assert s.chains[0].skeleton == "aligned"  # the brute-force suites test non-trivial perms
  assert "skeleton=aligned" in str(s)
  modulo = gsgd_jax.infer_structure(params, skeleton="modulo")
  assert modulo.chains[0].perms is None and modulo.chains[0].skeleton == "modulo"
  for seed in range(3):
    twin, _ = gsgd_jax.random_rescale(modulo, params, jax.random.PRNGKey(seed), max_factor=20.0)
    assert gsgd_jax.infer_structure(twin) == s
  # The aligned skeleton maximizes the summed log|w| of its skeleton edges (per set, given the
  # previous sets): at least as large as the modulo skeleton's.
  def skel_log(structure):
    mask = gsgd_jax.skeleton_mask(structure, params)
    return sum(float(np.sum(np.log(np.abs(np.asarray(w)))[np.asarray(m)]))
               for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)))
  assert skel_log(s) >= skel_log(modulo) - 1e-9


@pytest.mark.parametrize("name", list(MODELS))
def test_traced_aligned_skeleton_invariant_per_own_params(x64, name):
  """Conv chains and residual branches: each network gets the skeleton built from its own
  weights, and one step from a network and from its rescaled twin gives the same function."""
  model, in_shape, lr = MODELS[name]
  params, apply_fn, x, loss = _setup(model(), in_shape)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert any(c.skeleton == "aligned" for c in s.chains)
  twin, _ = gsgd_jax.random_rescale(s, params, jax.random.PRNGKey(3), max_factor=5.0)
  s_twin = gsgd_jax.trace_structure(apply_fn, twin, x)
  assert s_twin == s
  a = _runner(gsgd_jax.gsgd(lr, momentum=0.9, structure=s), loss)(params, 2)
  b = _runner(gsgd_jax.gsgd(lr, momentum=0.9, structure=s_twin), loss)(twin, 2)
  np.testing.assert_allclose(apply_fn(b, x), apply_fn(a, x), rtol=1e-8, atol=1e-10)


def test_alignment_lifts_the_smallest_skeleton_path_at_he_init():
  model = models.MLP(features=(128,) * 4, num_classes=10)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 40)))["params"]
  modulo, _ = pathspace.smallest_skeleton_path(
      gsgd_jax.infer_structure(params, skeleton="modulo"), params)
  aligned, _ = pathspace.smallest_skeleton_path(gsgd_jax.infer_structure(params), params)
  assert modulo < 1e-6 and aligned > 1e-4, (modulo, aligned)


def test_alignment_needs_values_and_real_weights():
  shapes = {"Dense_0": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32)},
            "Dense_1": {"kernel": jax.ShapeDtypeStruct((4, 2), jnp.float32)}}
  with pytest.raises(ValueError, match=r"concrete parameter values.*skeleton='modulo'"):
    gsgd_jax.infer_structure(shapes)
  assert gsgd_jax.infer_structure(shapes, skeleton="modulo").chains[0].widths == (3, 4, 2)
  with pytest.raises(ValueError, match="Unknown skeleton"):
    gsgd_jax.infer_structure(shapes, skeleton="diagonal")
  complex_params = {"Dense_0": {"kernel": jnp.ones((3, 4), jnp.complex64)},
                    "Dense_1": {"kernel": jnp.ones((4, 2), jnp.complex64)}}
  with pytest.raises(ValueError, match="'Dense_0/kernel' has dtype complex64"):
    gsgd_jax.infer_structure(complex_params)
  with pytest.raises(ValueError, match="not a permutation"):
    gsgd_jax.Chain(gsgd_jax.infer_structure(shapes, skeleton="modulo").chains[0].layers,
                   perms=((0, 0, 1, 2),))


def test_path_scales_at_the_reference_init_are_one(x64):
  """Skeleton weights 1: s = 1, so balance=0 gives exactly the paper's G-SGD (balance=1 too,
  except for the skeleton-only paths' 1/n factor)."""
  params = mlp_params((3, 5, 5, 2), bias=True)
  s = gsgd_jax.infer_structure(params)
  reset = gsgd_jax.reset_skeleton(s, params)
  np.testing.assert_allclose(gsgd_jax.path_scales(s, reset), [1.0], rtol=1e-12)
  assert abs(float(gsgd_jax.path_scales(s, params)[0]) - 1.0) > 0.01
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3), jnp.float64)
  grads = jax.grad(lambda p: jnp.mean(mlp_apply(p, x) ** 2))(reset)
  for kw in (dict(), dict(momentum=0.9)):
    ours = gsgd_jax.gsgd(0.1, structure=s, coordinates=gsgd_jax.PathCoordinates(balance=0.0), **kw)
    paper = gsgd_jax.gsgd(0.1, structure=s, coordinates=gsgd_jax.PAPER, **kw)
    u1, _ = ours.update(grads, ours.init(reset), reset)
    u2, _ = paper.update(grads, paper.init(reset), reset)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14), u1, u2)


def test_path_scales_are_invariant_and_jittable(x64):
  params = mlp_params(WIDTHS["mixed"], bias=True)
  s = gsgd_jax.infer_structure(params)
  twin, _ = gsgd_jax.random_rescale(s, params, jax.random.PRNGKey(1), max_factor=10.0)
  np.testing.assert_allclose(gsgd_jax.path_scales(s, twin), gsgd_jax.path_scales(s, params),
                             rtol=1e-12)
  np.testing.assert_allclose(jax.jit(lambda p: gsgd_jax.path_scales(s, p))(params),
                             gsgd_jax.path_scales(s, params), rtol=1e-12)


def test_coordinates_are_validated_and_old_keywords_name_their_replacement():
  with pytest.raises(ValueError, match=r"balance must be in \[0, 1\]"):
    gsgd_jax.PathCoordinates(balance=2.0)
  with pytest.raises(ValueError, match=r"min_ratio must be in \(0, 1\)"):
    gsgd_jax.PathCoordinates(min_ratio=2.0)
  for kw, fix in ((dict(balance=0.5), r"PathCoordinates\(balance=...\)"),
                  (dict(normalize=False), r"gsgd_jax.PAPER"),
                  (dict(min_ratio=None), r"PathCoordinates\(min_ratio=...\)")):
    for factory in (gsgd_jax.gsgd, gsgd_jax.gsgd_adam):
      with pytest.raises(TypeError, match=fix):
        factory(0.1, **kw)
    with pytest.raises(TypeError, match=fix):
      gsgd_jax.allocate_path_updates(**kw)
  with pytest.raises(AttributeError, match="PathSpaceState"):
    gsgd_jax.GSpaceState  # noqa: B018


def _one_channel_convnet():
  """A 1-D convnet whose first layer has one input channel (so each channel's skeleton edge
  must come from its three taps) and whose channel 0 has a centre tap 1e-4 of its others."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3,))(x))
      x = nn.relu(nn.Conv(4, (3,))(x))
      return nn.Dense(2)(jnp.mean(x, axis=1))

  x = jax.random.normal(jax.random.PRNGKey(1), (5, 9, 1), jnp.float64)
  params = jax.tree.map(lambda a: a.astype(jnp.float64),
                        Net().init(jax.random.PRNGKey(0), x)["params"])
  k = params["Conv_0"]["kernel"]
  params["Conv_0"]["kernel"] = k.at[1, 0, 0].set(1e-4 * k[0, 0, 0])
  return params, lambda p, x: Net().apply({"params": p}, x), x


def test_conv_skeleton_edges_sit_at_each_pairs_largest_tap(x64):
  """``skeleton="aligned"`` puts each channel pair's skeleton edge at its largest tap
  (``Chain.taps``), so a tiny centre tap no longer makes a tiny skeleton path; ``"modulo"`` keeps
  the paper's centre taps. The taps are part of the JSON, the fingerprint and the summary."""
  params, apply_fn, x = _one_channel_convnet()
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  modulo = gsgd_jax.trace_structure(apply_fn, params, x, skeleton="modulo")
  chain = s.chains[0]
  assert chain.skeleton == "aligned" and modulo.chains[0].taps is None
  # layer 1: the incoming skeleton edge of every output channel is its largest tap
  in_taps, _ = chain.layer_taps(0)
  k = np.abs(np.asarray(params["Conv_0"]["kernel"]))[:, 0, :]  # (taps, out)
  units = chain.perm(1)
  np.testing.assert_array_equal(np.asarray(in_taps), np.argmax(k[:, units], axis=0))
  mask = np.asarray(gsgd_jax.skeleton_mask(s, params)["Conv_0"]["kernel"])[:, 0, :]
  np.testing.assert_array_equal(mask, np.arange(3)[:, None] == np.argmax(k, axis=0)[None, :])
  # the tiny centre tap made the smallest skeleton-only path about 1e-4 of the others
  from gsgd_jax._scales import smallest_skeleton_path
  v_aligned, _ = smallest_skeleton_path(s, params)
  v_modulo, _ = smallest_skeleton_path(modulo, params)
  assert v_aligned > 300 * v_modulo
  assert gsgd_jax.BasisPathStructure.from_json(s.to_json()) == s
  assert "a chosen tap per channel pair" in str(s) and "skeleton at tap (1,)" in str(modulo)
  from gsgd_jax._json import fingerprint
  centre = gsgd_jax.BasisPathStructure(
      (dataclasses.replace(chain, taps=None),), s.fallback, s.notes, s.bn_scaling)
  assert fingerprint(centre) != fingerprint(s)
  # JSON written before taps existed (no "taps" key) loads with centre taps: its fingerprint, and
  # so the optimizer states saved with it, are those of before
  old = s.to_dict()
  for c in old["chains"]:
    del c["taps"]
  assert gsgd_jax.BasisPathStructure.from_dict(old) == centre
  # a state made with centre taps is refused by the structure with chosen taps
  with pytest.raises(ValueError, match="skeleton"):
    tx = gsgd_jax.gsgd(0.1, structure=s)
    grads = jax.tree.map(jnp.ones_like, params)
    tx.update(grads, gsgd_jax.gsgd(0.1, structure=centre).init(params), params)


def test_fingerprints_of_structures_without_taps_are_unchanged():
  """Optimizer states carry their structure's fingerprint; the values of structures without
  chosen taps are those the library wrote before taps existed (computed then), so such states
  still resume."""
  from gsgd_jax._json import fingerprint
  params = mlp_params((3, 5, 4, 2), bias=True, dtype=jnp.float32)
  modulo = gsgd_jax.infer_structure(params, skeleton="modulo")
  aligned = dataclasses.replace(modulo, chains=(dataclasses.replace(
      modulo.chains[0], perms=((3, 4, 1, 2, 0), (3, 2, 1, 0))),))
  assert fingerprint(aligned) == 331116608
  assert fingerprint(modulo) == 895712447


def test_chain_taps_are_validated(x64):
  params, apply_fn, x = _one_channel_convnet()
  chain = gsgd_jax.trace_structure(apply_fn, params, x).chains[0]
  with pytest.raises(ValueError, match="needs 3 entries of skeleton taps"):
    dataclasses.replace(chain, taps=chain.taps[:2])
  with pytest.raises(ValueError, match=r"Conv_1/kernel.*one tap per output channel"):
    dataclasses.replace(chain, taps=(chain.taps[0], ((0,) * 3, (0,) * 4), chain.taps[2]))
  # layer 2 (4 -> 4 between hidden layers): its skeleton edges are both incoming and outgoing
  in_taps, out_taps = chain.taps[1]
  bad = ((in_taps[0] + 1) % 3,) + tuple(in_taps[1:])
  with pytest.raises(ValueError, match="disagree on the edge"):
    dataclasses.replace(chain, taps=(chain.taps[0], (bad, out_taps), chain.taps[2]))
