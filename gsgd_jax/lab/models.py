"""Flax linen ReLU networks with predictable parameter names.

* :class:`MLP`: ``Dense_0 .. Dense_n`` (auto-named), ReLU between, logits out.
* :class:`CNN1D`: ``Conv_0 ..`` (auto-named) over the length axis, global average pool, ``Dense_0``.
* :class:`PlainNet`: ``stem``, ``stage{s}_conv{i}``, optional ``stem_bn`` / ``stage{s}_bn{i}``,
  global average pooling, ``head``.
* :class:`ResNet`: ``stem`` (+ ``stem_bn``), basic blocks ``stage{s}_block{b}`` with ``conv1``,
  ``conv2`` (+ ``bn1``, ``bn2``) and a 1x1 ``proj`` shortcut (+ ``proj_bn``) where the shape
  changes, global average pooling, ``head``.

All models are called as ``model.apply(variables, x, train=...)``; ``train`` switches BatchNorm to
batch statistics (pass ``mutable=['batch_stats']``) and is ignored by models without norm.
Hidden layers use He-normal kernels (ReLU networks), output layers flax's LeCun-normal default.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "MLP",
    "CNN1D",
    "PlainNet",
    "BasicBlock",
    "ResNet",
    "reference_mlp",
    "plainnet34",
    "resnet18",
    "resnet34",
    "make_model",
    "MODELS",
]

MODELS = ("mlp", "reference_mlp", "cnn1d", "plainnet", "plainnet34", "resnet", "resnet18",
          "resnet34")

Initializer = Callable[..., jax.Array]

_he_normal = nn.initializers.he_normal()
_PAD3 = ((1, 1), (1, 1))


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _maybe_norm(x: jax.Array, norm: bool, train: bool, name: str) -> jax.Array:
  """``x`` through BatchNorm ``name`` when ``norm``, unchanged otherwise."""
  return _batch_norm(train, name)(x) if norm else x


def _square_conv(width: int, size: int, strides: int, use_bias: bool, kernel_init: Initializer,
                 name: str) -> nn.Conv:
  """A ``size x size`` conv: padding 1 for 3x3 (shape-preserving at stride 1), none for 1x1."""
  return nn.Conv(width, (size, size), strides=(strides, strides),
                 padding=_PAD3 if size == 3 else "VALID", use_bias=use_bias,
                 kernel_init=kernel_init, name=name)


def _check_stages(stage_sizes: Sequence[int], widths: Sequence[int]) -> None:
  if len(stage_sizes) != len(widths):
    raise ValueError(f"stage_sizes {tuple(stage_sizes)} and widths {tuple(widths)} "
                     "must have the same length.")


def _stem(x: jax.Array, width: int, use_bias: bool, kernel_init: Initializer, norm: bool,
          train: bool) -> jax.Array:
  """``relu(stem_bn(stem(x)))``: the 3x3 stem of PlainNet and ResNet (BatchNorm optional)."""
  x = _square_conv(width, 3, 1, use_bias, kernel_init, "stem")(x)
  return nn.relu(_maybe_norm(x, norm, train, "stem_bn"))


def _pool_head(x: jax.Array, num_classes: int) -> jax.Array:
  """Global average pooling, then the Dense ``head``."""
  return nn.Dense(num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def _stage_widths(width: int) -> tuple[int, int, int, int]:
  return (width, 2 * width, 4 * width, 8 * width)


class MLP(nn.Module):
  """Fully connected ReLU network on flattened inputs.

  Attributes:
    features: widths of the hidden layers; the layers are ``Dense_0 .. Dense_{len(features)-1}``
      and the output layer is ``Dense_{len(features)}``.
    num_classes: number of logits.
    use_bias: whether the Dense layers have biases.
    kernel_init: initializer of the hidden kernels.
  """

  features: Sequence[int]
  num_classes: int
  use_bias: bool = True
  kernel_init: Initializer = _he_normal

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the network.

    Args:
      x: ``(N, ...)`` inputs, flattened to ``(N, -1)``.
      train: ignored (no normalization layers).

    Returns:
      Logits of shape ``(N, num_classes)``.
    """
    del train
    x = x.reshape((x.shape[0], -1))
    for f in self.features:
      x = nn.relu(nn.Dense(f, use_bias=self.use_bias, kernel_init=self.kernel_init)(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias)(x)


def reference_mlp(num_classes: int = 10) -> MLP:
  """The G-SGD reference code's MNIST network: four hidden layers of 64 units, no biases.

  Args:
    num_classes: number of logits.

  Returns:
    An :class:`MLP` with ``features=(64, 64, 64, 64)`` and ``use_bias=False``.
  """
  return MLP(features=(64, 64, 64, 64), num_classes=num_classes, use_bias=False)


class CNN1D(nn.Module):
  """1-D ReLU convnet for MNIST-1D: convs over the length axis, global average pool, Dense head.

  Attributes:
    channels: output channels of the conv layers ``Conv_0, Conv_1, ...``.
    num_classes: number of logits (head ``Dense_0``).
    kernel_size: conv kernel length.
    use_bias: whether the convs and the head have biases.
    strides: stride of every conv (an int) or of each conv (a sequence).
    kernel_init: initializer of the conv kernels.
  """

  channels: Sequence[int] = (32, 32, 32)
  num_classes: int = 10
  kernel_size: int = 3
  use_bias: bool = True
  strides: int | Sequence[int] = 1
  kernel_init: Initializer = _he_normal

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the network.

    Args:
      x: ``(N, L)`` or ``(N, L, C)``.
      train: ignored (no normalization layers).

    Returns:
      Logits of shape ``(N, num_classes)``.
    """
    del train
    if x.ndim == 2:
      x = x[..., None]
    strides = ([self.strides] * len(self.channels) if isinstance(self.strides, int)
               else list(self.strides))
    if len(strides) != len(self.channels):
      raise ValueError(f"Got {len(strides)} strides for {len(self.channels)} conv layers.")
    for c, s in zip(self.channels, strides):
      x = nn.Conv(c, (self.kernel_size,), strides=(s,), padding="SAME", use_bias=self.use_bias,
                  kernel_init=self.kernel_init)(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=1)
    return nn.Dense(self.num_classes, use_bias=self.use_bias)(x)


class PlainNet(nn.Module):
  """A plain (no shortcut) ReLU convnet for NHWC images, e.g. 32x32 CIFAR.

  ``stem`` (3x3) -> stages of 3x3 convs ``stage{s}_conv{i}`` (stride 2 at the first conv of every
  stage after the first) -> global average pool -> ``head``. With ``norm``, each conv is followed by
  BatchNorm (``stem_bn``, ``stage{s}_bn{i}``) and has no bias.

  Attributes:
    stage_sizes: number of convs per stage.
    widths: channels per stage (the stem has ``widths[0]``).
    num_classes: number of logits.
    norm: add BatchNorm after each conv.
    use_bias: conv biases when ``norm`` is False (the head always has one).
    kernel_init: initializer of the conv kernels.
  """

  stage_sizes: Sequence[int] = (2, 2, 2)
  widths: Sequence[int] = (16, 32, 64)
  num_classes: int = 10
  norm: bool = False
  use_bias: bool = True
  kernel_init: Initializer = _he_normal

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the network.

    Args:
      x: ``(N, H, W, C)``.
      train: if True, BatchNorm uses batch statistics (and updates ``batch_stats``).

    Returns:
      Logits of shape ``(N, num_classes)``.
    """
    _check_stages(self.stage_sizes, self.widths)
    bias = self.use_bias and not self.norm
    x = _stem(x, self.widths[0], bias, self.kernel_init, self.norm, train)
    for s, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      for i in range(n):
        strides = 2 if s > 0 and i == 0 else 1
        x = _square_conv(w, 3, strides, bias, self.kernel_init, f"stage{s}_conv{i}")(x)
        x = nn.relu(_maybe_norm(x, self.norm, train, f"stage{s}_bn{i}"))
    return _pool_head(x, self.num_classes)

  def chain_kernel_paths(self) -> list[str]:
    """Kernel paths in data-flow order, e.g. for ``gsgd_jax.chain_structure(params, [paths])``.

    Parameter names do not sort in data-flow order (``head`` < ``stage0_conv0`` < ``stem``), so
    :func:`gsgd_jax.structure.infer_structure` cannot order this network by itself.
    """
    paths = ["stem/kernel"]
    for s, n in enumerate(self.stage_sizes):
      paths += [f"stage{s}_conv{i}/kernel" for i in range(n)]
    return paths + ["head/kernel"]


def plainnet34(num_classes: int = 10, norm: bool = False, width: int = 64) -> PlainNet:
  """34-layer plain net: stem, 32 convs in stages (6, 8, 12, 6), head; widths ``w .. 8w``.

  Args:
    num_classes: number of logits.
    norm: add BatchNorm after each conv (the convs then have no bias).
    width: channels of the first stage (and the stem); the stages have ``(w, 2w, 4w, 8w)``.

  Returns:
    A :class:`PlainNet` with ``stage_sizes=(6, 8, 12, 6)``.
  """
  return PlainNet(stage_sizes=(6, 8, 12, 6), widths=_stage_widths(width),
                  num_classes=num_classes, norm=norm)


class BasicBlock(nn.Module):
  """ResNet basic block: ``relu(shortcut(x) + conv2(relu(conv1(x))))`` (BatchNorm optional).

  Attributes:
    width: output channels.
    strides: stride of ``conv1`` and of the projection.
    norm: BatchNorm after each conv (``bn1``, ``bn2``, ``proj_bn``); convs then have no bias.
    kernel_init: initializer of the conv kernels.
  """

  width: int
  strides: int = 1
  norm: bool = True
  kernel_init: Initializer = _he_normal

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the network.

    Args:
      x: ``(N, H, W, C)``.
      train: if True, BatchNorm uses batch statistics (and updates ``batch_stats``).

    Returns:
      Features of shape ``(N, H / strides, W / strides, width)``.
    """
    def conv(size: int, strides: int, name: str) -> nn.Conv:
      return _square_conv(self.width, size, strides, not self.norm, self.kernel_init, name)

    y = nn.relu(_maybe_norm(conv(3, self.strides, "conv1")(x), self.norm, train, "bn1"))
    y = _maybe_norm(conv(3, 1, "conv2")(y), self.norm, train, "bn2")
    if self.strides != 1 or x.shape[-1] != self.width:
      x = _maybe_norm(conv(1, self.strides, "proj")(x), self.norm, train, "proj_bn")
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet with basic blocks.

  ``stem`` (3x3, + ``stem_bn``) -> blocks ``stage{s}_block{b}`` (stride 2 at the first block of
  every stage after the first) -> global average pool -> ``head``.

  Attributes:
    stage_sizes: number of blocks per stage.
    widths: channels per stage (the stem has ``widths[0]``).
    num_classes: number of logits.
    norm: BatchNorm after every conv.
    kernel_init: initializer of the conv kernels.
  """

  stage_sizes: Sequence[int]
  widths: Sequence[int]
  num_classes: int = 10
  norm: bool = True
  kernel_init: Initializer = _he_normal

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Applies the network.

    Args:
      x: ``(N, H, W, C)``.
      train: if True, BatchNorm uses batch statistics (and updates ``batch_stats``).

    Returns:
      Logits of shape ``(N, num_classes)``.
    """
    _check_stages(self.stage_sizes, self.widths)
    x = _stem(x, self.widths[0], not self.norm, self.kernel_init, self.norm, train)
    for s, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      for b in range(n):
        x = BasicBlock(w, strides=2 if s > 0 and b == 0 else 1, norm=self.norm,
                       kernel_init=self.kernel_init, name=f"stage{s}_block{b}")(x, train)
    return _pool_head(x, self.num_classes)


def resnet18(num_classes: int = 10, norm: bool = True, width: int = 64) -> ResNet:
  """ResNet-18 for CIFAR: blocks (2, 2, 2, 2), widths ``(w, 2w, 4w, 8w)``.

  Args:
    num_classes: number of logits.
    norm: BatchNorm after every conv.
    width: channels of the first stage (and the stem).

  Returns:
    A :class:`ResNet` with ``stage_sizes=(2, 2, 2, 2)``.
  """
  return ResNet(stage_sizes=(2, 2, 2, 2), widths=_stage_widths(width),
                num_classes=num_classes, norm=norm)


def resnet34(num_classes: int = 10, norm: bool = True, width: int = 64) -> ResNet:
  """ResNet-34 for CIFAR: blocks (3, 4, 6, 3), widths ``(w, 2w, 4w, 8w)``.

  Args:
    num_classes: number of logits.
    norm: BatchNorm after every conv.
    width: channels of the first stage (and the stem).

  Returns:
    A :class:`ResNet` with ``stage_sizes=(3, 4, 6, 3)``.
  """
  return ResNet(stage_sizes=(3, 4, 6, 3), widths=_stage_widths(width),
                num_classes=num_classes, norm=norm)


def make_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds a model by name.

  Args:
    name: one of :data:`MODELS` (``'mlp'``, ``'reference_mlp'``, ``'cnn1d'``, ``'plainnet'``,
      ``'plainnet34'``, ``'resnet'`` (a :class:`ResNet` of any ``stage_sizes`` / ``widths``,
      default ``(2, 2)`` / ``(16, 32)``), ``'resnet18'``, ``'resnet34'``); case, ``-`` and ``_``
      are ignored.
    num_classes: number of logits.
    **kwargs: passed to the model or its constructor function (``features`` for ``'mlp'``,
      defaulting to ``(64, 64, 64, 64)``; ``width`` / ``norm`` for the deep nets; ...).

  Returns:
    The (unbound) linen module.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> model = make_model('mlp', 3, features=(5,))
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4)))['params']
    >>> sorted(params)
    ['Dense_0', 'Dense_1']
  """
  key = name.lower().replace("-", "").replace("_", "")
  if key == "mlp":
    kwargs.setdefault("features", (64, 64, 64, 64))
    return MLP(num_classes=num_classes, **kwargs)
  builders = {
      "referencemlp": reference_mlp,
      "cnn1d": lambda n, **kw: CNN1D(num_classes=n, **kw),
      "plainnet": lambda n, **kw: PlainNet(num_classes=n, **kw),
      "plainnet34": plainnet34,
      "resnet": lambda n, stage_sizes=(2, 2), widths=(16, 32), **kw: ResNet(
          stage_sizes=stage_sizes, widths=widths, num_classes=n, **kw),
      "resnet18": resnet18,
      "resnet34": resnet34,
  }
  if key in builders:
    return builders[key](num_classes, **kwargs)
  raise ValueError(f"Unknown model {name!r}; choose one of {MODELS}.")
