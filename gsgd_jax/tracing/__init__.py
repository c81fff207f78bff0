"""Structure discovery by tracing: which layers of a model form chains of basis paths.

:func:`trace_structure` traces ``apply_fn(params, *inputs)`` with ``jax.make_jaxpr`` and reads the
basis-path structure off the jaxpr, for linen, nnx or plain-function models alike:

1. **Layers.** A ``dot_general`` whose kernel is a parameter of shape ``(in, out)`` contracted on
   its first axis is a Dense layer; a ``conv_general_dilated`` with an ``(*taps, in, out)`` kernel
   (flax's HWIO layout, channels last) is a convolution. The kernel is the parameter leaf itself
   (reshapes and dtype casts allowed); a bias is a per-channel parameter added to the layer output.
2. **Dataflow.** Every value is classified: a *positively homogeneous, channel-wise* function of
   one layer's output (scaling output channel ``j`` of the layer by ``c > 0`` scales channel ``j``
   of the value by ``c`` and nothing else) or not. Homogeneous operations are the bias add, ReLU
   (``max`` with 0, also leaky ReLU via ``select_n``), reshapes that keep the channel axis last, a
   flatten (``(..., H, W, C) -> (..., H*W*C)``: the next Dense layer reads its kernel as
   ``(H, W, C, out)``, positions acting as taps), transposes/slices/pads/concatenations that do not
   touch the channel axis, sum/average/max pooling over positions, ``mean``, multiplication by
   anything that does not depend on layer outputs (constants, dropout masks, per-channel scales),
   dtype casts, and the sum of two homogeneous functions of the same layer. Anything else ends the
   chain: ``tanh``, ``gelu``, ``exp``, products of activations, maxima with non-zero values,
   reductions over channels, normalization, ...
3. **Chains.** Layer ``A`` links to layer ``B`` when every use of ``A``'s output flows, through
   homogeneous operations only, into ``B``'s input and nowhere else. A value that feeds more than
   one consumer (a residual stream, a skip), that is a sum of several branches, or that is a network
   output is a chain boundary. In a ResNet each residual branch (``conv1 -> conv2``, or the three
   convolutions of a bottleneck) becomes its own chain, as in the reference code; the stem, the
   projection shortcuts and the classifier head are single layers.

Policies (documented choices):

* **Single-layer chains go to the fallback.** G-SGD on a lone layer has no hidden nodes and is
  plain SGD, so such a layer is listed in ``structure.fallback`` with the reason it stands alone
  (the reference code trains the stem, shortcut convolutions and the classifier by plain SGD).
* **Normalization** (``normalization=``) is recognised by its arithmetic: a layer output
  multiplied by an ``rsqrt`` of its own statistics (BatchNorm/LayerNorm/GroupNorm/RMSNorm with
  batch statistics) or of running averages. ``"exact"`` (default; ``"fallback"`` in gsgd_jax 0.1): a normalized layer
  output ends its chain. Normalization divides each output channel by its own scale, so the
  channel's incoming weights are scale-invariant on their own and the loss is no longer a function
  of path values; in a BatchNorm ResNet every convolution is then a single layer and G-SGD reduces
  to the fallback optimizer. ``"reference"``: the reference code's treatment: chains run through
  normalization layers as if they were absent (``conv -> BN -> relu -> conv`` is one chain) and
  the normalization scales and offsets are trained by the fallback. This is a heuristic: the
  update is then neither exact in path space nor invariant under rescaling.
* **Unsupported layers** (grouped/depthwise convolutions) and **shared parameters** raise a
  ``ValueError`` naming the parameter; with ``unsupported="exclude"`` they go to the fallback.

Everything ``apply_fn`` returns counts as network output, except that a linen-style
``(y, mutated_collections)`` pair (``model.apply(..., mutable=['batch_stats'])``) counts as ``y``.
Operations that do not contribute to the outputs (dead code, e.g. running-average updates that are
not returned) are ignored.

What is and is not looked into:

* **Inlined calls.** ``jit``/``pjit``, ``closed_call``, ``custom_jvp_call`` (``jax.nn.relu``,
  ``gelu``), ``custom_vjp_call`` and ``remat``/``checkpoint`` (``nn.remat``, ``jax.checkpoint``)
  bodies are inlined: layers inside them are found and chains run through them.
* **Conditionals.** ``cond`` (``lax.cond``, ``lax.switch``, ``nn.cond``) is inlined branch by
  branch: with a constant index only the taken branch; otherwise every branch, and the result is a
  ``select_n`` of the branch results, homogeneous when every branch returns the same homogeneous
  function of one layer (e.g. ReLU in one branch, leaky ReLU in the other). A parameter used in
  several branches counts as used several times (weight sharing).
* **Stacks of layers are unrolled; other loops are opaque.** A ``scan`` that slices parameter
  leaves (``nn.scan`` / ``nnx.scan`` over layers: the ``n`` kernels in one leaf of shape
  ``(n, *kernel)``), of at most ``UNROLL_LIMIT`` (512) steps, is unrolled: step ``i`` reads slice
  ``i`` of each stacked leaf as a parameter of its own, ``leaf[i]`` (a
  :class:`gsgd_jax.StackIndex` ends its path), so its layers join chains like unrolled ones. A
  stacked leaf is in G-space whole or not at all. Other ``scan`` bodies (weights shared by every
  step, as in an RNN; ``fori_loop`` with static bounds) and ``while`` bodies are not traced into:
  values through them end their chains and the parameters they read go to the fallback, with a
  note (also listed by :func:`trace_report`).
* **Other primitives** without a rule (custom primitives, ``shard_map``, ...) get the generic
  rule: they end every chain through them and the parameters they read go to the fallback.
* **Layouts.** A Dense layer must be a ``dot_general`` contracting the last input axis with an
  ``(in, out)`` kernel and a convolution must be channels-last with a ``(*taps, in, out)`` kernel
  (other layouts go to the fallback with a note); a GroupNorm with several groups reshapes the
  channel axis and ends the chain even under ``normalization="reference"``.

Extending: each primitive's handling is a *rule* in a table keyed by primitive name
(:mod:`gsgd_jax.tracing.rules`); :func:`register_rule` adds one for a custom primitive (see
:func:`homogeneous_elementwise` for a ready-made rule and the rule signature).

Modules: :mod:`~gsgd_jax.tracing.graph` (the jaxpr as a flat graph, sub-jaxprs inlined),
:mod:`~gsgd_jax.tracing.values` (the :class:`Kind`/:class:`Role` enums and the records),
:mod:`~gsgd_jax.tracing.context` (the dataflow pass and the state rules work with),
:mod:`~gsgd_jax.tracing.rules` (the rule table, :data:`DEFAULT_RULES`),
:mod:`~gsgd_jax.tracing.report` (structure, notes and chain-boundary explanations),
:mod:`~gsgd_jax.tracing.api` (the entry points).
"""

from gsgd_jax.tracing.api import trace_nnx_structure, trace_report, trace_structure
from gsgd_jax.tracing.context import Context, Rule
from gsgd_jax.tracing.rules import DEFAULT_RULES, homogeneous_elementwise, register_rule
from gsgd_jax.tracing.values import End, Kind, Role, Value

__all__ = ["trace_structure", "trace_nnx_structure", "trace_report", "DEFAULT_RULES",
           "homogeneous_elementwise", "Context", "Rule", "Kind", "Role", "End", "Value",
           "register_rule"]


def __getattr__(name):
  if name == "RULES":
    raise AttributeError("gsgd_jax.tracing.RULES was removed in gsgd_jax 0.2 (a process-global "
                         "table): read gsgd_jax.tracing.DEFAULT_RULES and pass "
                         "rules={**DEFAULT_RULES, name: rule} to trace_structure. See CHANGELOG.md.")
  raise AttributeError(f"module 'gsgd_jax.tracing' has no attribute {name!r}")
