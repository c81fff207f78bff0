"""Patterns of real Flax model code: sharding constraints between layers, zero-initialized
layers, non-ReLU activations named in the report, ``trace_report`` arguments, nnx keyword
inputs. Each model gets the chains a reader expects, ``verify_structure`` passes (or says what it
could not test), and a few training steps run."""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import gsgd_jax

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _train(apply_fn, params, structure, x, y, steps=10, lr=0.05):
  tx = gsgd_jax.gsgd(lr, momentum=0.9, structure=structure)
  loss = lambda p: jnp.mean((apply_fn(p, x) - y) ** 2)  # noqa: E731
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  p = params
  for _ in range(steps):
    u, state = step(p, state)
    p = optax.apply_updates(p, u)
  return float(loss(params)), float(loss(p))


def _data(d=6, k=3, n=32):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(n, k)), jnp.float32))


def _linen(model, x):
  """``(params, apply_fn)`` of a linen model without other collections."""
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  return params, lambda p, x: model.apply({"params": p}, x)


def test_sharding_constraints_between_layers():
  """The GSPMD-guide pattern: ``with_sharding_constraint`` on activations (a one-device mesh
  here; the annotation is the same primitive on any mesh)."""
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for width in (16, 16):
        x = nn.relu(nn.Dense(width)(x))
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data", None)))
      return nn.Dense(3)(x)

  x, y = _data()
  params, apply_fn = _linen(MLP(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert [[l.kernel[0] for l in c.layers] for c in s.chains] == [["Dense_0", "Dense_1", "Dense_2"]]
  gsgd_jax.verify_structure(s, apply_fn, params, x)
  before, after = _train(apply_fn, params, s, x, y)
  assert after < before


class ZeroHead(nn.Module):
  """A head initialized to zero (common in vision code)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3, kernel_init=nn.initializers.zeros, name="head")(x)


def test_zero_initialized_head_goes_to_the_fallback_with_a_note():
  x, y = _data()
  params, apply_fn = _linen(ZeroHead(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert [[l.kernel[0] for l in c.layers] for c in s.chains] == [["Dense_0", "Dense_1"]]
  assert ("head", "kernel") in s.fallback and "all zeros" in dict(s.notes)[("head", "kernel")]
  assert "all zeros" in gsgd_jax.trace_report(apply_fn, params, x)
  # the bare call reads names: the same split, and it trains without touching the model
  tx = gsgd_jax.gsgd(0.05)
  with pytest.warns(gsgd_jax.GSpaceWarning, match="inferred from parameter names: chain "
                                                   "Dense_0 -> Dense_1"):
    tx.init(params)
  before, after = _train(apply_fn, params, s, x, y)
  assert after < before
  # once trained, the head is non-zero and a new structure takes it in
  s2 = gsgd_jax.infer_structure(optax.apply_updates(
      params, jax.tree.map(lambda a: 0.01 * jnp.ones_like(a), params)))
  assert len(s2.chains[0].layers) == 3


def test_verify_structure_says_what_it_could_not_test():
  """Behind a zero head the output cannot change under any rescaling: no silent pass."""
  x, _ = _data()
  params, apply_fn = _linen(ZeroHead(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  with pytest.warns(gsgd_jax.GSpaceWarning, match=r"could not test chain 0, hidden layer 1 "
                                                   r"\(after 'Dense_0/kernel'\)"):
    gsgd_jax.verify_structure(s, apply_fn, params, x)
  # a fitting structure with a live output: quiet
  params["head"]["kernel"] = jnp.ones_like(params["head"]["kernel"])
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    gsgd_jax.verify_structure(gsgd_jax.trace_structure(apply_fn, params, x), apply_fn, params, x)


@pytest.mark.parametrize("act,name", [(jax.nn.gelu, "GELU"), (jnp.tanh, "tanh"),
                                      (jax.nn.silu, "SiLU")])
def test_non_relu_activations_are_named(act, name):
  params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 2))}}
  f = lambda p, x: act(x @ p["a"]["kernel"]) @ p["b"]["kernel"]  # noqa: E731
  s = gsgd_jax.trace_structure(f, params, jnp.ones((1, 3)))
  assert s.chains == ()
  note = dict(s.notes)[("a", "kernel")]
  assert name in note and "not positively homogeneous" in note, note


def test_trace_report_takes_the_structure_arguments_and_is_exported():
  x, _ = _data()

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))

  params, apply_fn = _linen(MLP(), x)
  assert "skeleton=aligned" in gsgd_jax.trace_report(apply_fn, params, x, skeleton="aligned")
  assert "skeleton=modulo" in gsgd_jax.trace_report(apply_fn, params, x, skeleton="modulo")


def test_trace_nnx_structure_with_rngs_keyword():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(4, 8, rngs=rngs)
      self.b = nnx.Linear(8, 8, rngs=rngs)
      self.c = nnx.Linear(8, 2, rngs=rngs)
      self.drop = nnx.Dropout(0.5)

    def __call__(self, x, rngs=None):
      x = nnx.relu(self.a(x))
      x = nnx.relu(self.b(x))
      return self.c(self.drop(x, deterministic=rngs is None, rngs=rngs))

  model = Net(nnx.Rngs(0))
  x = jnp.ones((2, 4))
  s_kw = gsgd_jax.trace_nnx_structure(model, x, rngs=nnx.Rngs(1))
  s_plain = gsgd_jax.trace_nnx_structure(model, x)
  assert [l.kernel for l in s_plain.chains[0].layers] == [("a", "kernel"), ("b", "kernel"),
                                                        ("c", "kernel")]
  assert ("a", "kernel") in {l.kernel for c in s_kw.chains for l in c.layers}


def _names(s):
  return [[gsgd_jax.tracing.values.layer_name(l.kernel) for l in c.layers] for c in s.chains]


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(8)(x)), None


class ScanMLP(nn.Module):
  """Layers stacked with ``nn.scan`` (kernels ``(3, 8, 8)``, biases ``(3, 8)``)."""
  reverse: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8)(x))
    x, _ = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3, reverse=self.reverse)(name="stack")(x, None)
    return nn.Dense(3)(x)


@pytest.mark.parametrize("reverse", [False, True])
def test_linen_scan_over_layers_is_one_chain(reverse):
  """Tracing unrolls the scan: slice i of the stacked leaf is a layer (a reversed scan runs its
  slices last to first), the structure verifies, trains, and equals name inference's."""
  x, y = _data()
  params, apply_fn = _linen(ScanMLP(reverse), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  order = [2, 1, 0] if reverse else [0, 1, 2]
  assert _names(s) == [["Dense_0"] + [f"stack/Dense_0[{i}]" for i in order] + ["Dense_1"]]
  assert s.fallback == () and s.stacked == {("stack", "Dense_0", "kernel"),
                                            ("stack", "Dense_0", "bias")}
  gsgd_jax.verify_structure(s, apply_fn, params, x)
  before, after = _train(apply_fn, params, s, x, y)
  assert after < 0.85 * before
  if not reverse:  # names order the layers as the data flows here: inference agrees
    flat = {"a": params["Dense_0"], "b": params["stack"]["Dense_0"], "c": params["Dense_1"]}
    assert gsgd_jax.infer_structure(flat).chains[0].widths == s.chains[0].widths


def test_nnx_scan_over_layers_is_one_chain():
  """flax's nnx pattern: blocks created under ``nnx.vmap``, applied with ``nnx.scan``; trained
  with ``nnx.Optimizer``."""
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
      return nnx.relu(self.lin(x))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.inp = nnx.Linear(6, 8, rngs=rngs)

      @nnx.split_rngs(splits=4)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def blocks(rngs):
        return Block(rngs)

      self.blocks = blocks(rngs)
      self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def forward(x, block):
        return block(x)

      return self.out(forward(nnx.relu(self.inp(x)), self.blocks))

  x, y = _data()
  model = Net(nnx.Rngs(0))
  s = gsgd_jax.trace_nnx_structure(model, x)
  assert _names(s) == [["inp"] + [f"blocks/lin[{i}]" for i in range(4)] + ["out"]]
  opt = nnx.Optimizer(model, gsgd_jax.gsgd(0.05, momentum=0.9, structure=s), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, g)
    return loss

  losses = [float(step(model, opt)) for _ in range(10)]
  assert losses[-1] < 0.95 * losses[0]


def test_scanned_transformer_keeps_each_layers_relu_mlp():
  """A transformer stack scanned over layers: every layer's ReLU MLP is a chain of its own (two
  slices), the attention stays in the fallback."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attention")(h)
      h = nn.LayerNorm()(x)
      return x + nn.Dense(4, name="mlp_out")(nn.relu(nn.Dense(16, name="mlp_in")(h))), None

  class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
      x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=2)(name="layers")(x, None)
      return x

  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 4))
  params, apply_fn = _linen(Encoder(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert _names(s) == [[f"layers/mlp_in[{i}]", f"layers/mlp_out[{i}]"] for i in range(2)]
  notes = dict(s.notes)
  assert "attention" in notes[("layers", "attention", "query", "kernel")]
  gsgd_jax.verify_structure(s, apply_fn, params, x)
  before, after = _train(apply_fn, params, s, x, jnp.zeros_like(x), steps=5, lr=0.02)
  assert after < before


def test_stack_used_outside_the_scan_stays_whole_in_the_fallback():
  """A stacked leaf is in G-space whole or not at all: read outside the scan as well (here a
  penalty in the output), every slice leaves the chains, with a note on the leaf."""
  x, _ = _data()
  params, apply_fn = _linen(ScanMLP(), x)

  def f(p, x):
    return apply_fn(p, x) + jnp.sum(p["stack"]["Dense_0"]["kernel"] ** 2)

  s = gsgd_jax.trace_structure(f, params, x)
  assert s.chains == () and ("stack", "Dense_0", "kernel") in s.fallback
  note = dict(s.notes)[("stack", "Dense_0", "kernel")]
  assert "in G-space whole or not at all" in note and "also used outside the scan" in note


def test_zero_slice_takes_the_whole_stack_out():
  x, _ = _data()
  params, apply_fn = _linen(ScanMLP(), x)
  params["stack"]["Dense_0"]["kernel"] = params["stack"]["Dense_0"]["kernel"].at[1].set(0.0)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert s.chains == ()
  notes = dict(s.notes)
  assert "all zeros" in notes[("stack", "Dense_0", "kernel")]
  assert "left alone" in notes[("Dense_0", "kernel")]
  with pytest.warns(gsgd_jax.GSpaceWarning, match="nothing is in G-space"):
    _train(apply_fn, params, s, x, jnp.zeros((x.shape[0], 3)), steps=2)


def test_stacked_kernel_without_bias_is_not_misread():
  """Names cannot tell a bias-less stack ``(n, in, out)`` from a conv1d kernel: name inference
  refuses, naming scan and trace_structure; the bare optimizer says the same."""

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.relu(nn.Dense(8, use_bias=False)(x)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(8)(x)
      x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)()(x, None)
      return nn.Dense(2)(x)

  x, _ = _data()
  params, apply_fn = _linen(Stack(), x)
  with pytest.raises(ValueError, match=r"stack of 3 layers made with nn.scan.*trace_structure"):
    gsgd_jax.infer_structure(params)
  with pytest.raises(ValueError, match=r"nn.scan.*trace_structure"):
    gsgd_jax.gsgd(0.1).init(params)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert _names(s) == [["Dense_0"] + [f"ScanBlock_0/Dense_0[{i}]" for i in range(3)]
                       + ["Dense_1"]] or len(s.chains[0].layers) == 5


class BNBlock(nn.Module):
  """A residual block with data-parallel BatchNorm (flax's ImageNet example:
  ``axis_name="batch"``), in train mode."""
  axis_name: str | None = "batch"

  @nn.compact
  def __call__(self, x):
    bn = lambda name: nn.BatchNorm(use_running_average=False, axis_name=self.axis_name,  # noqa: E731
                                   name=name)
    h = nn.relu(bn("bn1")(nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x)))
    h = bn("bn2")(nn.Conv(4, (3, 3), use_bias=False, name="conv2")(h))
    return nn.relu(x + h)


@pytest.mark.parametrize("how", ["no_axis", "vmap", "shard_map"])
def test_data_parallel_batchnorm_is_traced_like_single_device(how):
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 4))
  variables = BNBlock(axis_name=None).init(jax.random.PRNGKey(0), x)
  params = variables["params"]
  model = BNBlock(axis_name=None if how == "no_axis" else "batch")

  def per_device(p, x):
    return model.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0]

  if how == "no_axis":
    apply_fn = per_device
  elif how == "vmap":  # one device: the named axis bound by vmap, as in flax's examples
    apply_fn = lambda p, x: jax.vmap(per_device, in_axes=(None, 0),  # noqa: E731
                                     axis_name="batch")(p, x[:, None])[:, 0]
  else:
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    apply_fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("batch")),
                             out_specs=P("batch"))
  s = gsgd_jax.trace_structure(apply_fn, params, x, normalization="reference")
  assert [[l.kernel[0] for l in c.layers] for c in s.chains] == [["conv1", "conv2"]]
  assert all(l.normalized for l in s.chains[0].layers) and s.bn_scaling == "weight"
  y = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  before, after = _train(apply_fn, params, s, x, y, steps=5, lr=0.02)
  assert np.isfinite(after) and after < before


def test_shard_map_body_is_traced():
  mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))

  def f(p, x):
    return jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"]

  params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 2))}}
  g = jax.shard_map(f, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P("batch"))
  s = gsgd_jax.trace_structure(g, params, jnp.ones((4, 3)), skeleton="modulo")
  assert s.chains[0].widths == (3, 4, 2)
  # params split across devices (jax.pmap over replicated params) are not misread as layers
  rep = jax.tree.map(lambda a: a[None], params)
  s = gsgd_jax.trace_structure(lambda p, x: jax.pmap(f)(p, x), rep, jnp.ones((1, 4, 3)),
                               skeleton="modulo")
  assert s.chains == () and set(s.fallback) == {("a", "kernel"), ("b", "kernel")}


def test_transformer_block_keeps_its_relu_mlp():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attention")(h)
      h = nn.LayerNorm()(x)
      return x + nn.Dense(4, name="mlp_out")(nn.relu(nn.Dense(16, name="mlp_in")(h)))

  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 4))
  params, apply_fn = _linen(Block(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert [[l.kernel[0] for l in c.layers] for c in s.chains] == [["mlp_in", "mlp_out"]]
  notes = dict(s.notes)
  assert "attention is not positively homogeneous" in notes[("attention", "query", "kernel")]
  gsgd_jax.verify_structure(s, apply_fn, params, x)
  before, after = _train(apply_fn, params, s, x, jnp.zeros_like(x), steps=5, lr=0.02)
  assert after < before
