"""Models: output shapes, parameter names, BatchNorm state (tiny widths, 8x8 images)."""

import jax
import jax.numpy as jnp
import pytest

from gsgd_jax.lab import models
from gsgd_jax import chain_structure, infer_structure

pytestmark = pytest.mark.usefixtures("fast_compiles")

KEY = jax.random.PRNGKey(0)
IMAGES = jnp.ones((2, 8, 8, 3))


def _init(model, x):
  """Variables with the shapes of ``model.init`` but cheap deterministic values.

  Compiling the random initializers costs about a second per distinct kernel shape on CPU, so
  only :func:`test_mlp_names_and_shapes` runs a real ``init``.
  """
  shapes = jax.eval_shape(model.init, KEY, x)
  fill = lambda s: (0.5 + 0.3 * jnp.cos(0.7 * jnp.arange(s.size))).reshape(s.shape).astype(s.dtype)
  return jax.tree.map(fill, shapes)


def test_mlp_names_and_shapes():
  model = models.MLP(features=(6,) * 10, num_classes=6)
  x = jnp.ones((3, 2, 3))  # flattened to (3, 6)
  variables = model.init(KEY, x)  # a real init (one kernel shape: one compilation)
  params = variables["params"]
  assert list(variables) == ["params"]
  assert sorted(params, key=lambda n: int(n.split("_")[1])) == [f"Dense_{i}" for i in range(11)]
  assert params["Dense_0"]["kernel"].shape == (6, 6)
  assert params["Dense_10"]["kernel"].shape == (6, 6) and params["Dense_10"]["bias"].shape == (6,)
  assert model.apply(variables, x).shape == (3, 6)
  assert jnp.all(jnp.isfinite(model.apply(variables, x)))
  assert infer_structure(params).chains[0].widths == (6,) * 12


def test_reference_mlp():
  model = models.reference_mlp()
  params = jax.eval_shape(model.init, KEY, jnp.ones((1, 28, 28)))["params"]
  assert sorted(params) == [f"Dense_{i}" for i in range(5)]
  assert all(set(p) == {"kernel"} for p in params.values())  # no biases
  assert params["Dense_0"]["kernel"].shape == (784, 64)
  assert params["Dense_4"]["kernel"].shape == (64, 10)


def test_cnn1d():
  model = models.CNN1D(channels=(4, 5), num_classes=3)
  x = jnp.ones((2, 40))
  variables = _init(model, x)
  params = variables["params"]
  assert sorted(params) == ["Conv_0", "Conv_1", "Dense_0"]
  assert params["Conv_0"]["kernel"].shape == (3, 1, 4)
  assert params["Conv_1"]["kernel"].shape == (3, 4, 5) and params["Conv_1"]["bias"].shape == (5,)
  assert params["Dense_0"]["kernel"].shape == (5, 3)
  assert model.apply(variables, x).shape == (2, 3)
  assert model.apply(variables, x[..., None]).shape == (2, 3)
  strided = models.CNN1D(channels=(4, 4), num_classes=3, strides=(1, 2), use_bias=False)
  v = _init(strided, x)
  assert "bias" not in v["params"]["Conv_0"] and strided.apply(v, x).shape == (2, 3)
  # One chain: conv, conv, Dense after global pooling.
  assert infer_structure(params).chains[0].widths == (1, 4, 5, 3)


@pytest.mark.parametrize("norm", [False, True])
def test_plainnet(norm):
  model = models.PlainNet(stage_sizes=(2, 1), widths=(4, 8), num_classes=3, norm=norm)
  variables = _init(model, IMAGES)
  params = variables["params"]
  convs = {"stem", "stage0_conv0", "stage0_conv1", "stage1_conv0"}
  bns = {"stem_bn", "stage0_bn0", "stage0_bn1", "stage1_bn0"} if norm else set()
  assert set(params) == convs | bns | {"head"}
  assert params["stage1_conv0"]["kernel"].shape == (3, 3, 4, 8)
  assert ("bias" in params["stem"]) == (not norm)
  assert ("batch_stats" in variables) == norm
  if norm:
    assert set(variables["batch_stats"]) == bns
    out, updates = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    assert set(updates) == {"batch_stats"}
  else:
    out = model.apply(variables, IMAGES, train=True)
  assert out.shape == (2, 3)
  assert model.apply(variables, IMAGES).shape == (2, 3)
  # Stride 2 at the first conv of stage 1: 8x8 -> 4x4.
  _, inter = model.apply(variables, IMAGES, capture_intermediates=True)
  assert inter["intermediates"]["stage1_conv0"]["__call__"][0].shape == (2, 4, 4, 8)
  if not norm:
    s = chain_structure(params, [model.chain_kernel_paths()])
    assert s.chains[0].widths == (3, 4, 4, 4, 8, 3) and not s.fallback


def test_plainnet34():
  model = models.plainnet34(num_classes=3, width=2)
  params = jax.eval_shape(model.init, KEY, IMAGES)["params"]  # names and shapes only
  convs = [n for n in params if n.startswith("stage")]
  assert len(convs) == 32 and len(params) == 34  # 32 convs + stem + head
  assert params["stage3_conv5"]["kernel"].shape == (3, 3, 16, 16)
  assert len(model.chain_kernel_paths()) == 34


@pytest.mark.parametrize("norm", [False, True])
def test_resnet18(norm):
  model = models.resnet18(num_classes=3, norm=norm, width=4)
  variables = _init(model, IMAGES)
  params = variables["params"]
  blocks = {f"stage{s}_block{b}" for s in range(4) for b in range(2)}
  assert set(params) == blocks | {"stem", "head"} | ({"stem_bn"} if norm else set())
  first = params["stage0_block0"]
  assert set(first) == ({"conv1", "conv2", "bn1", "bn2"} if norm else {"conv1", "conv2"})
  down = params["stage1_block0"]
  assert "proj" in down and down["proj"]["kernel"].shape == (1, 1, 4, 8)
  assert ("proj_bn" in down) == norm
  assert down["conv1"]["kernel"].shape == (3, 3, 4, 8)
  assert "proj" not in params["stage1_block1"]
  assert ("bias" in first["conv1"]) == (not norm)
  assert params["head"]["kernel"].shape == (32, 3)
  assert ("batch_stats" in variables) == norm
  if norm:
    assert set(variables["batch_stats"]["stage1_block0"]) == {"bn1", "bn2", "proj_bn"}
    out, _ = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
  else:
    out = model.apply(variables, IMAGES, train=True)
  assert out.shape == (2, 3)
  assert model.apply(variables, IMAGES).shape == (2, 3)


def test_resnet34_blocks():
  model = models.resnet34(num_classes=3, norm=False, width=2)
  shapes = jax.eval_shape(model.init, KEY, IMAGES)["params"]  # no compute
  blocks = [n for n in shapes if "_block" in n]
  assert len(blocks) == 16
  assert {"stage2_block5", "stage3_block2"} <= set(blocks)


def test_make_model():
  x = jnp.ones((2, 8))
  assert models.make_model("mlp", 3, features=(4,)).apply(
      _init(models.make_model("mlp", 3, features=(4,)), x), x).shape == (2, 3)
  assert isinstance(models.make_model("reference_mlp", 10), models.MLP)
  assert models.make_model("cnn1d", 4, channels=(2,)).num_classes == 4
  assert models.make_model("plainnet", 5, widths=(2, 2, 2)).widths == (2, 2, 2)
  assert models.make_model("plainnet34", 10).stage_sizes == (6, 8, 12, 6)
  r18 = models.make_model("resnet18", 100, width=8, norm=False)
  assert r18.widths == (8, 16, 32, 64) and r18.num_classes == 100 and not r18.norm
  assert models.make_model("ResNet-34", 10).stage_sizes == (3, 4, 6, 3)
  with pytest.raises(ValueError, match="resnet18"):
    models.make_model("vgg", 10)
