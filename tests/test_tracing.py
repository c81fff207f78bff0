"""trace_structure: structure discovery by tracing linen, nnx and plain-function models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gsgd_jax
from gsgd_jax.tracing import trace_report

pytestmark = pytest.mark.usefixtures("fast_compiles")

# ------------------------------------------------------------------------------------------------
# Tiny models (also used by test_conv_math.py)
# ------------------------------------------------------------------------------------------------


class MLP(nn.Module):
  widths: tuple = (3, 4, 3, 4, 3, 4, 3, 4, 3, 4, 3, 2)

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = nn.Dense(w)(x)
      if i < len(self.widths) - 1:
        x = nn.relu(x)
    return x


class PlainNet(nn.Module):
  """3x3 convolutions, global average pooling, a classifier: one chain."""

  features: tuple = (2, 3, 3)

  @nn.compact
  def __call__(self, x):
    for f in self.features:
      x = nn.relu(nn.Conv(f, (3, 3))(x))
    return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))


class NnxPlainNet(nnx.Module):

  def __init__(self, rngs, features=(1, 2, 3, 3)):
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), rngs=rngs)
                           for a, b in zip(features[:-1], features[1:])])
    self.head = nnx.Linear(features[-1], 2, rngs=rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return self.head(x.mean(axis=(1, 2)))


class Block(nn.Module):
  features: int
  strides: int = 1
  bn: bool = False

  @nn.compact
  def __call__(self, x, train=True):
    def norm(name):
      if not self.bn:
        return lambda y: y
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)

    y = nn.relu(norm("bn1")(nn.Conv(self.features, (3, 3), self.strides, name="conv1")(x)))
    y = norm("bn2")(nn.Conv(self.features, (3, 3), name="conv2")(y))
    if x.shape[-1] != self.features or self.strides != 1:
      x = norm("proj_bn")(nn.Conv(self.features, (1, 1), self.strides, name="proj")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Stem, an identity block, a block with a 1x1 projection shortcut, pooling, head."""

  bn: bool = False

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(2, (3, 3), name="stem")(x)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x)
    x = nn.relu(x)
    x = Block(2, bn=self.bn, name="block1")(x, train)
    x = Block(3, 2, bn=self.bn, name="block2")(x, train)
    return nn.Dense(2, name="head")(jnp.mean(x, axis=(1, 2)))


def resnet_chains():
  return [["block1/conv1/kernel", "block1/conv2/kernel"],
          ["block2/conv1/kernel", "block2/conv2/kernel"]]


def linen_setup(model, x, dtype=jnp.float32, seed=0, **apply_kwargs):
  """``(params, apply_fn, variables)`` with ``apply_fn(params, x)`` as trace_structure wants it.

  Variables are drawn with numpy from the shapes (``jax.eval_shape``: no compilation): kernels
  ``N(0, 1/fan_in)``, normalization scales and running variances 1, running means 0.1, biases 0.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), dtype)
    fill = {"scale": 1.0, "var": 1.0, "mean": 0.1}.get(name, 0.0)
    return jnp.full(leaf.shape, fill, dtype)

  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  variables = jax.tree_util.tree_map_with_path(draw, shapes)

  def apply_fn(params, inputs):
    return model.apply({**variables, "params": params}, inputs, **apply_kwargs)

  return variables["params"], apply_fn, variables


def _kernels(structure):
  return [["/".join(map(str, l.kernel)) for l in c.layers] for c in structure.chains]


def _fallback(structure):
  return {"/".join(map(str, p)) for p in structure.fallback}


# ------------------------------------------------------------------------------------------------
# Dense networks
# ------------------------------------------------------------------------------------------------


def test_linen_mlp_matches_infer_structure():
  x = jnp.ones((2, 5))
  params, apply_fn, _ = linen_setup(MLP(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert s == gsgd_jax.infer_structure(params)
  # data-flow order, not flatten order (Dense_10 flattens before Dense_2)
  assert _kernels(s) == [[f"Dense_{i}/kernel" for i in range(12)]]
  assert s.chains[0].widths == (5,) + MLP.widths
  assert not s.fallback


def test_order_follows_data_flow_not_names():
  class Reversed(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(4, name="z")(x))
      x = nn.relu(nn.Dense(3, name="b")(x))
      return nn.Dense(2, name="a")(x)

  x = jnp.ones((2, 3))
  params, apply_fn, _ = linen_setup(Reversed(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert s == gsgd_jax.chain_structure(params, [["z/kernel", "b/kernel", "a/kernel"]])
  assert _kernels(gsgd_jax.infer_structure(params)) != _kernels(s)  # name order is wrong here


@pytest.mark.parametrize("container", ["list", "sequential"])
def test_nnx_mlp(container):
  rngs = nnx.Rngs(0)
  if container == "list":
    class Net(nnx.Module):
      def __init__(self):
        self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 5, rngs=rngs),
                                nnx.Linear(5, 2, rngs=rngs)])

      def __call__(self, x):
        for layer in self.layers[:-1]:
          x = nnx.relu(layer(x))
        return self.layers[-1](x)

    model, names = Net(), [0, 1, 2]
  else:
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.relu, nnx.Linear(4, 5, rngs=rngs),
                           nnx.relu, nnx.Linear(5, 2, rngs=rngs))
    names = [0, 2, 4]
  graphdef, state = nnx.split(model, nnx.Param)
  x = jnp.ones((2, 3))
  s = gsgd_jax.trace_structure(lambda st, x: nnx.merge(graphdef, st)(x), state, x)
  want = gsgd_jax.chain_structure(state, [[("layers", i, "kernel") for i in names]])
  assert s == want
  assert s.chains[0].widths == (3, 4, 5, 2)
  # Unwrapped params (a pure dict) give the same paths.
  pure = nnx.to_pure_dict(state)

  def from_pure(p, x):
    st = nnx.clone(state)
    nnx.replace_by_pure_dict(st, p)
    return nnx.merge(graphdef, st)(x)

  assert gsgd_jax.trace_structure(from_pure, pure, x).chains == s.chains


# ------------------------------------------------------------------------------------------------
# Convolutional networks
# ------------------------------------------------------------------------------------------------


def test_linen_plainnet_is_one_chain():
  x = jnp.ones((2, 5, 5, 1))
  params, apply_fn, _ = linen_setup(PlainNet(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  want = gsgd_jax.chain_structure(params, [["Conv_0/kernel", "Conv_1/kernel", "Conv_2/kernel",
                                            "Dense_0/kernel"]])
  assert s == want
  assert [l.taps_shape for l in s.chains[0].layers] == [(3, 3)] * 3 + [()]
  assert s.chains[0].widths == (1, 2, 3, 3, 2)


def test_nnx_plainnet_is_one_chain():
  model = NnxPlainNet(nnx.Rngs(0))
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  x = jnp.ones((2, 5, 5, 1))
  s = gsgd_jax.trace_structure(lambda st, x: nnx.merge(graphdef, st, rest)(x), state, x)
  want = gsgd_jax.chain_structure(
      state, [[("convs", 0, "kernel"), ("convs", 1, "kernel"), ("convs", 2, "kernel"),
               ("head", "kernel")]])
  assert s == want
  # the structure drives gsgd on the nnx state
  tx = gsgd_jax.gsgd(0.1, structure=s)
  grads = jax.tree.map(jnp.ones_like, nnx.to_pure_dict(state))
  updates, _ = tx.update(grads, tx.init(nnx.to_pure_dict(state)), nnx.to_pure_dict(state))
  assert jax.tree.structure(updates) == jax.tree.structure(grads)


def test_nnx_batchnorm_in_training_mode():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv1 = nnx.Conv(1, 3, (3, 3), use_bias=False, rngs=rngs)
      self.bn1 = nnx.BatchNorm(3, rngs=rngs)
      self.conv2 = nnx.Conv(3, 3, (3, 3), use_bias=False, rngs=rngs)
      self.bn2 = nnx.BatchNorm(3, rngs=rngs)
      self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn1(self.conv1(x)))
      x = nnx.relu(self.bn2(self.conv2(x)))
      return self.head(x.mean(axis=(1, 2)))

  graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
  x = jnp.ones((2, 5, 5, 1))
  # batch statistics are updated in place: pass them in, so that they belong to the trace
  apply_fn = lambda p, r, x: nnx.merge(graphdef, p, r)(x)
  exact = gsgd_jax.trace_structure(apply_fn, params, rest, x)
  assert exact.chains == () and len(exact.fallback) == 8
  ref = gsgd_jax.trace_structure(apply_fn, params, rest, x, normalization="reference")
  assert _kernels(ref) == [["conv1/kernel", "conv2/kernel", "head/kernel"]]
  assert _fallback(ref) == {f"bn{i}/{k}" for i in (1, 2) for k in ("scale", "bias")}


@pytest.mark.parametrize("ndim", [1, 2])
def test_conv_flatten_dense_reads_positions_as_taps(ndim):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      k = (3,) * ndim
      x = nn.relu(nn.Conv(3, k, strides=2)(x))
      x = nn.relu(nn.Conv(2, (2,) * ndim, padding="VALID", use_bias=False)(x))
      return nn.Dense(2)(x.reshape((x.shape[0], -1)))

  x = jnp.ones((2,) + (5,) * ndim + (1,))
  params, apply_fn, _ = linen_setup(Net(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  spatial = (2,) * ndim  # 5 -> 3 (stride 2, SAME) -> 2 (2-tap VALID)
  want = gsgd_jax.chain_structure(params, [["Conv_0/kernel", "Conv_1/kernel",
                                            ("Dense_0/kernel", spatial)]])
  assert s == want
  assert s.chains[0].layers[-1].taps_shape == spatial
  assert s.chains[0].layers[1].bias is None


def test_homogeneous_operations_keep_the_chain():
  """Leaky ReLU, dropout, pooling, circular padding, dilation, transposes: still one chain."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.leaky_relu(nn.Conv(3, (3, 3), padding="CIRCULAR")(x))
      x = nn.Dropout(0.3, deterministic=False)(x)
      x = nn.avg_pool(x, (2, 2), padding="SAME", count_include_pad=False)
      x = nn.relu(nn.Conv(3, (2, 2), kernel_dilation=2)(x))
      x = jnp.transpose(nn.max_pool(x, (2, 2)), (0, 2, 1, 3)) * 0.5
      x = jnp.where(x > 0, x, 0.0)
      return nn.Dense(2)(jnp.max(x, axis=(1, 2)))

  x = jnp.ones((2, 5, 5, 1))
  model = Net()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x, rngs={"dropout": jax.random.PRNGKey(1)})
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert _kernels(s) == [["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel"]]
  assert not s.fallback


# ------------------------------------------------------------------------------------------------
# Residual networks and normalization
# ------------------------------------------------------------------------------------------------


def test_resnet_chains_are_residual_branches():
  x = jnp.ones((2, 5, 5, 1))
  params, apply_fn, _ = linen_setup(ResNet(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  want = gsgd_jax.chain_structure(params, resnet_chains())
  assert s.chains == want.chains and set(s.fallback) == set(want.fallback)
  notes = {"/".join(map(str, p)): n for p, n in s.notes}
  assert _fallback(s) == {f"{m}/{k}" for m in ("stem", "block2/proj", "head")
                          for k in ("kernel", "bias")}
  for m in ("stem", "block2/proj", "head"):
    assert notes[f"{m}/kernel"].startswith("single layer")
  assert "summed with another branch" in notes["block2/proj/kernel"]
  assert "network input" in notes["stem/kernel"]
  assert "residual stream" in notes["head/kernel"]
  report = trace_report(apply_fn, params, x)
  assert "chain 0 (block1/conv1 -> block1/conv2)" in report
  assert "ends: its output is summed with another branch" in report


def test_bottleneck_branch_is_one_chain():
  class Bottleneck(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
      y = nn.relu(nn.Conv(2, (1, 1), name="conv1")(x))
      y = nn.relu(nn.Conv(2, (3, 3), name="conv2")(y))
      y = nn.Conv(4, (1, 1), name="conv3")(y)
      x = nn.relu(x + y)
      return nn.Dense(2, name="head")(x.mean(axis=(1, 2)))

  x = jnp.ones((2, 5, 5, 1))
  params, apply_fn, _ = linen_setup(Bottleneck(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert _kernels(s) == [["conv1/kernel", "conv2/kernel", "conv3/kernel"]]
  assert s.chains[0].widths == (4, 2, 2, 4)


@pytest.mark.parametrize("train", [True, False], ids=["batch_stats", "running_average"])
def test_batchnorm_resnet_fallback_policy(train):
  x = jnp.ones((4, 5, 5, 1))
  kwargs = {"train": True, "mutable": ["batch_stats"]} if train else {"train": False}
  params, apply_fn, _ = linen_setup(ResNet(bn=True), x, **kwargs)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  # Every conv is normalized: no chain of two layers is left, everything is in the fallback.
  assert s.chains == ()
  assert len(s.fallback) == len(jax.tree.leaves(params))
  notes = {"/".join(map(str, p)): n for p, n in s.notes}
  assert "normalized" in notes["block1/conv1/kernel"]
  assert "normalized" in notes["stem/kernel"]
  assert notes["block1/bn1/scale"].startswith("normalization scale")
  assert notes["block1/bn1/bias"].startswith("normalization offset")
  assert "no chain of two or more layers" in trace_report(apply_fn, params, x)


@pytest.mark.parametrize("train", [True, False], ids=["batch_stats", "running_average"])
def test_batchnorm_resnet_reference_policy(train):
  x = jnp.ones((4, 5, 5, 1))
  kwargs = {"train": True, "mutable": ["batch_stats"]} if train else {"train": False}
  params, apply_fn, _ = linen_setup(ResNet(bn=True), x, **kwargs)
  s = gsgd_jax.trace_structure(apply_fn, params, x, normalization="reference")
  assert _kernels(s) == resnet_chains()
  fallback = _fallback(s)
  for bn in ("stem_bn", "block1/bn1", "block1/bn2", "block2/bn1", "block2/bn2", "block2/proj_bn"):
    assert {f"{bn}/scale", f"{bn}/bias"} <= fallback
  assert {"stem/kernel", "block2/proj/kernel", "head/kernel"} <= fallback
  notes = {"/".join(map(str, p)): n for p, n in s.notes}
  assert "normalization='reference'" in notes["block1/bn1/scale"]


def test_reference_policy_chains_through_layernorm():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.LayerNorm()(nn.Dense(3)(x)))
      x = nn.relu(nn.Dense(4)(x))
      return nn.Dense(2)(x)

  x = jnp.ones((2, 3))
  params, apply_fn, _ = linen_setup(Net(), x)
  exact = gsgd_jax.trace_structure(apply_fn, params, x)
  assert _kernels(exact) == [["Dense_1/kernel", "Dense_2/kernel"]]
  assert "normalized" in dict(exact.notes)[("Dense_0", "kernel")]
  ref = gsgd_jax.trace_structure(apply_fn, params, x, normalization="reference")
  assert _kernels(ref) == [["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]]
  assert _fallback(ref) == {"LayerNorm_0/scale", "LayerNorm_0/bias"}


# ------------------------------------------------------------------------------------------------
# Chain ends and errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", [jnp.tanh, nn.gelu, lambda x: jnp.minimum(nn.relu(x), 6.0),
                                 lambda x: x * nn.relu(x)], ids=["tanh", "gelu", "relu6", "square"])
def test_non_homogeneous_activation_ends_the_chain(act):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = act(nn.Dense(3)(x))
      x = nn.relu(nn.Dense(3)(x))
      return nn.Dense(2)(x)

  x = jnp.ones((2, 3))
  params, apply_fn, _ = linen_setup(Net(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert _kernels(s) == [["Dense_1/kernel", "Dense_2/kernel"]]
  notes = dict(s.notes)
  assert notes[("Dense_0", "kernel")].startswith("single layer")
  if act is jnp.tanh:
    assert "not positively homogeneous after it: tanh" in notes[("Dense_0", "kernel")]


class Depthwise(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    x = nn.relu(nn.Conv(3, (3, 3), feature_group_count=3, name="depthwise")(x))
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    return nn.Dense(2)(x.mean(axis=(1, 2)))


def test_depthwise_conv_raises_or_falls_back():
  x = jnp.ones((2, 5, 5, 1))
  params, apply_fn, _ = linen_setup(Depthwise(), x)
  with pytest.raises(ValueError, match=r"depthwise/kernel.*unsupported='exclude'"):
    gsgd_jax.trace_structure(apply_fn, params, x)
  s = gsgd_jax.trace_structure(apply_fn, params, x, unsupported="exclude")
  assert _kernels(s) == [["Conv_1/kernel", "Dense_0/kernel"]]
  notes = {"/".join(map(str, p)): n for p, n in s.notes}
  assert "grouped/depthwise" in notes["depthwise/kernel"]
  assert notes["depthwise/bias"] == "bias of the unsupported layer depthwise"
  assert "unsupported layer depthwise" in notes["Conv_0/kernel"]


def test_weight_sharing_raises():
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(3, name="shared")
      x = nn.relu(dense(nn.relu(dense(nn.Dense(3)(x)))))
      return nn.Dense(2)(x)

  x = jnp.ones((2, 3))
  params, apply_fn, _ = linen_setup(Shared(), x)
  with pytest.raises(ValueError, match=r"'shared/kernel' is used 2 times.*weight sharing"):
    gsgd_jax.trace_structure(apply_fn, params, x)
  s = gsgd_jax.trace_structure(apply_fn, params, x, unsupported="exclude")
  assert s.chains == ()
  assert "weight sharing" in dict(s.notes)[("shared", "kernel")]


def test_invalid_policies_raise():
  x = jnp.ones((2, 5))
  params, apply_fn, _ = linen_setup(MLP(), x)
  with pytest.raises(ValueError, match="normalization"):
    gsgd_jax.trace_structure(apply_fn, params, x, normalization="ignore")
  with pytest.raises(ValueError, match="unsupported"):
    gsgd_jax.trace_structure(apply_fn, params, x, unsupported="skip")


def test_unused_and_extra_parameters_go_to_fallback():
  params = {"a": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
            "b": {"kernel": jnp.ones((4, 2))}, "emb": jnp.ones((5, 3)), "unused": jnp.ones(2)}

  def apply_fn(p, ids):
    x = p["emb"][ids]  # an embedding lookup feeds the chain
    x = jax.nn.relu(x @ p["a"]["kernel"] + p["a"]["bias"])
    return x @ p["b"]["kernel"]

  s = gsgd_jax.trace_structure(apply_fn, params, jnp.array([0, 3]))
  assert _kernels(s) == [["a/kernel", "b/kernel"]]
  assert s.chains[0].layers[0].bias == ("a", "bias")
  notes = dict(s.notes)
  assert notes[("unused",)] == "not used by the traced function"
  assert "used outside any layer kernel" in notes[("emb",)]


# ------------------------------------------------------------------------------------------------
# Training smoke tests
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
  from sklearn.datasets import load_digits
  data = load_digits()
  x = (data.images[:300] / 16.0).astype(np.float32)[..., None]
  return jnp.asarray(x), jnp.asarray(data.target[:300])


class DigitsCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class DigitsBNResNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    x = nn.relu(bn()(nn.Conv(4, (3, 3), use_bias=False)(x)))
    y = nn.relu(bn()(nn.Conv(4, (3, 3), use_bias=False)(x)))
    y = bn()(nn.Conv(4, (3, 3), use_bias=False)(y))
    x = nn.relu(x + y)
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def _train(loss_fn, params, aux, tx, steps=50):
  state = tx.init(params)

  @jax.jit
  def step(params, aux, state):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, aux)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), aux, state, loss

  losses = []
  for _ in range(steps):
    params, aux, state, loss = step(params, aux, state)
    losses.append(float(loss))
  return losses


@pytest.mark.parametrize("lr,momentum", [(0.03, 0.0), (0.01, 0.9)])
def test_gsgd_trains_a_small_cnn_on_digits(digits, lr, momentum):
  x, y = digits
  params, apply_fn, _ = linen_setup(DigitsCNN(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert s.chains[0].layers[-1].taps_shape == (4, 4) and not s.fallback
  params = gsgd_jax.reset_skeleton(s, params)  # the reference code's initialization

  def loss_fn(p, aux):
    logits = apply_fn(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), aux

  losses = _train(loss_fn, params, None, gsgd_jax.gsgd(lr, momentum=momentum, structure=s))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.8 * losses[0]


def test_gsgd_trains_a_batchnorm_resnet_with_reference_policy(digits):
  x, y = digits
  model = DigitsBNResNet()
  variables = model.init(jax.random.PRNGKey(0), x)

  def apply_fn(p, inputs):
    return model.apply({**variables, "params": p}, inputs, mutable=["batch_stats"])

  s = gsgd_jax.trace_structure(apply_fn, variables["params"], x, normalization="reference")
  assert _kernels(s) == [["Conv_1/kernel", "Conv_2/kernel"]]

  def loss_fn(p, batch_stats):
    logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x,
                              mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new["batch_stats"]

  losses = _train(loss_fn, variables["params"], variables["batch_stats"],
                  gsgd_jax.gsgd(0.1, momentum=0.9, structure=s))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.85 * losses[0]


# ------------------------------------------------------------------------------------------------
# The rule table, inlined calls, conditionals and loops
# ------------------------------------------------------------------------------------------------


def _two_dense(act):
  params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 2))}}
  return params, lambda p, x: act(x @ p["a"]["kernel"]) @ p["b"]["kernel"]


def test_rules_for_a_custom_primitive_are_an_argument():
  from jax.extend.core import Primitive

  from gsgd_jax.tracing import DEFAULT_RULES, Kind, homogeneous_elementwise, register_rule

  relu_p = Primitive("test_custom_relu")
  relu_p.def_impl(lambda x: jnp.maximum(x, 0))
  relu_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
  params, f = _two_dense(relu_p.bind)
  x = jnp.ones((2, 3))
  s = gsgd_jax.trace_structure(f, params, x, skeleton="modulo")
  assert s.chains == ()  # unknown primitive: the generic rule ends the chain
  assert "not positively homogeneous after it: test_custom_relu" in dict(s.notes)[("a", "kernel")]
  rules = {**DEFAULT_RULES, "test_custom_relu": homogeneous_elementwise}
  s = gsgd_jax.trace_structure(f, params, x, skeleton="modulo", rules=rules)
  assert _kernels(s) == [["a/kernel", "b/kernel"]]
  assert "test_custom_relu" not in DEFAULT_RULES  # nothing global changed
  assert gsgd_jax.trace_structure(f, params, x, skeleton="modulo").chains == ()
  assert "chain 0 (a -> b)" in gsgd_jax.trace_report(f, params, x, rules=rules)

  seen = []

  def spy(ctx, node, ins):  # a rule sees the node and the operands' values
    seen.append((node.name, ins[0].kind, ctx.shape(node.outs[0])))
    return None  # None: the generic rule (ends the chain)

  rules = {**DEFAULT_RULES, "test_custom_relu": spy}
  assert gsgd_jax.trace_structure(f, params, x, skeleton="modulo", rules=rules).chains == ()
  assert seen == [("test_custom_relu", Kind.HOM, (2, 4))]
  rules = {**DEFAULT_RULES, "test_custom_relu": lambda ctx, node, ins: ["not a Value"]}
  with pytest.raises(TypeError, match="one Value per result"):
    gsgd_jax.trace_structure(f, params, x, skeleton="modulo", rules=rules)
  with pytest.raises(TypeError):
    DEFAULT_RULES["x"] = spy  # read-only
  # the removed global registry names its replacement
  with pytest.raises(TypeError, match=r"rules=\{\*\*gsgd_jax.tracing.DEFAULT_RULES"):
    register_rule(relu_p, homogeneous_elementwise)
  with pytest.raises(AttributeError, match="DEFAULT_RULES"):
    gsgd_jax.tracing.RULES  # noqa: B018


def test_value_kinds_and_roles_are_enums():
  from gsgd_jax.tracing import Kind, Role

  assert Kind.HOM.value == "hom" and Kind.CENTERED.homogeneous and Kind.PATTERN.invariant
  assert not Kind.MIXED.invariant and Role.NORM_SCALE.value == "norm_scale"


def test_remat_and_jit_bodies_are_inlined():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.remat(nn.Dense)(4)(x))
      x = jax.jit(nn.relu)(nn.Dense(4)(x))
      return nn.Dense(2)(x)

  x = jnp.ones((2, 3))
  params, apply_fn, _ = linen_setup(Net(), x)
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  assert [len(c.layers) for c in s.chains] == [3] and not s.fallback


def test_cond_branches_are_looked_into():
  params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 4))},
            "c": {"kernel": jnp.ones((4, 2))}}
  x, flag = jnp.ones((2, 3)), jnp.array(True)

  def f(p, x, flag):  # ReLU or leaky ReLU: homogeneous either way
    h = jax.lax.cond(flag, jax.nn.relu, lambda h: jnp.maximum(h, 0.1 * h), x @ p["a"]["kernel"])
    return h @ p["c"]["kernel"]

  s = gsgd_jax.trace_structure(f, params, x, flag, skeleton="modulo")
  assert _kernels(s) == [["a/kernel", "c/kernel"]]

  def g(p, x, flag):  # a layer inside a branch
    h = jax.nn.relu(x @ p["a"]["kernel"])
    h = jax.lax.cond(flag, lambda h: jax.nn.relu(h @ p["b"]["kernel"]), jnp.zeros_like, h)
    return h @ p["c"]["kernel"]

  s = gsgd_jax.trace_structure(g, params, x, flag, skeleton="modulo")
  assert _kernels(s) == [["a/kernel", "b/kernel", "c/kernel"]]

  def h(p, x, flag):  # a non-homogeneous branch ends the chain
    y = jax.lax.cond(flag, jax.nn.relu, jnp.tanh, x @ p["a"]["kernel"])
    return y @ p["c"]["kernel"]

  s = gsgd_jax.trace_structure(h, params, x, flag, skeleton="modulo")
  assert s.chains == ()
  assert "tanh (in cond branch 0)" in dict(s.notes)[("a", "kernel")]

  def const(p, x):  # a constant predicate: only the taken branch counts
    return jax.lax.cond(True, lambda x: jax.nn.relu(x @ p["a"]["kernel"]) @ p["c"]["kernel"],
                        lambda x: jnp.tanh(x @ p["a"]["kernel"]) @ p["c"]["kernel"], x)

  s = gsgd_jax.trace_structure(const, params, x, skeleton="modulo")
  assert _kernels(s) == [["a/kernel", "c/kernel"]]

  def shared(p, x, flag):  # one kernel in two branches: used twice
    return jax.lax.cond(flag, lambda x: jax.nn.relu(x @ p["a"]["kernel"]),
                        lambda x: jnp.tanh(x @ p["a"]["kernel"]), x) @ p["c"]["kernel"]

  with pytest.raises(ValueError, match=r"'a/kernel' is used 2 times.*cond branch"):
    gsgd_jax.trace_structure(shared, params, x, flag, skeleton="modulo")


def test_scanned_layers_join_the_chain():
  """A stack made with nn.scan (one leaf for three layers) is unrolled: slice ``i`` of the
  stacked kernel is a layer of the chain, ``'stack/Dense_0/kernel[i]'``."""
  class Cell(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.relu(nn.Dense(4)(x)), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(4, name="inp")(x))
      stack = nn.scan(Cell, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      x, _ = stack(name="stack")(x, None)
      x = nn.relu(nn.Dense(4, name="mid")(x))
      return nn.Dense(2, name="out")(x)

  x = jnp.ones((2, 3))
  params, apply_fn, _ = linen_setup(Net(), x)
  assert params["stack"]["Dense_0"]["kernel"].shape == (3, 4, 4)  # one leaf for three layers
  s = gsgd_jax.trace_structure(apply_fn, params, x)
  names = [[gsgd_jax.tracing.values.layer_name(l.kernel) for l in c.layers] for c in s.chains]
  assert names == [["inp", "stack/Dense_0[0]", "stack/Dense_0[1]", "stack/Dense_0[2]", "mid",
                    "out"]]
  assert s.fallback == ()
  assert "chain 0 (inp -> stack/Dense_0[0] -> stack/Dense_0[1]" in trace_report(apply_fn, params, x)


def test_scan_with_shared_weights_is_opaque():
  """A scan over data whose weights every step shares (an RNN cell) is not unrolled: the loop
  note says why its kernel is in the fallback, and the chains around it end there."""
  params = {"inp": {"kernel": jnp.ones((3, 4))}, "cell": {"kernel": jnp.ones((4, 4))},
            "out": {"kernel": jnp.ones((4, 2))}}

  def f(p, xs):  # xs: (time, batch, 3)
    def step(h, x):
      h = jax.nn.relu(h @ p["cell"]["kernel"] + jax.nn.relu(x @ p["inp"]["kernel"]))
      return h, None
    h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[1], 4)), xs)
    return h @ p["out"]["kernel"]

  xs = jnp.ones((5, 2, 3))
  s = gsgd_jax.trace_structure(f, params, xs, skeleton="modulo")
  assert s.chains == ()
  notes = {"/".join(map(str, p)): n for p, n in s.notes}
  assert "read inside scan" in notes["cell/kernel"] and "is not" in notes["cell/kernel"]
  assert "weights are shared by every step" in notes["cell/kernel"]
  report = trace_report(f, params, xs, skeleton="modulo")
  assert "loops (not traced into):" in report and "scan: reads" in report


def test_while_loop_is_opaque():
  params, _ = _two_dense(jax.nn.relu)

  def f(p, x):
    h = jax.nn.relu(x @ p["a"]["kernel"])
    h = jax.lax.while_loop(lambda c: c[1] < c[0].sum(), lambda c: (c[0] * 0.5, c[1] + 1),
                           (h, 0.0))[0]
    return h @ p["b"]["kernel"]

  x = jnp.ones((2, 3))
  s = gsgd_jax.trace_structure(f, params, x, skeleton="modulo")
  assert s.chains == ()
  assert "while (a loop" in dict(s.notes)[("a", "kernel")]
  assert "while: layers inside a loop body are not traced into" in trace_report(f, params, x)
