"""Issue 18: why G-SGD (library defaults) diverges on the MNIST-1D convnet, and a prototype fix.

Run from the repository root (2 CPU cores; minutes each):

    python examples/conv_tap_scales.py diag        # centre tap vs tap-RMS per channel; G-SGD lr 0.3
    python examples/conv_tap_scales.py centremax   # same init, largest tap moved to the centre
    python examples/conv_tap_scales.py taprms default-mnist1d-cnn results/taprms
    python examples/conv_tap_scales.py taprms default-digits-cnn results/taprms

``taprms`` reruns the G-space optimizers of a preset with the prototype below, monkeypatched into
the library at run time (no library file is edited): the balanced gauge of the per-path scales
(``balance > 0``) is computed from the tap-RMS of each skeleton channel pair's kernel slice instead
of its centre tap alone.

With ``q(e) = |W[c,i,j]| / rms_t W[t,i,j]`` for a skeleton edge ``e`` (invariant: numerator and
denominator scale alike under any rescaling) and ``rho'(u) = rho(u) / prod q`` over the skeleton
edges of ``u``'s skeleton path, the balanced gauge gives every skeleton slice the tap-RMS
``rho'(u)^(1/L)``, so its centre weight is ``rho'^(1/L) * q``. The scale of a non-skeleton edge
``i -> j`` in layer ``l`` becomes ``sigma' = rho'(i)^(l/L) Q_B(i) * rho'(j)^((L-1-l)/L) Q_F(j)``,
``Q_B`` / ``Q_F`` the products of ``q`` back from ``i`` / forward from ``j``. Dense layers have
``q = 1``: nothing changes for MLPs. Skeleton-only paths keep their scale. Everything stays a
function of path values, so the update stays exact and invariant (checked in float64 by
``invariance``: one step from ``w`` and from a rescaled ``w`` give the same function).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax._scales as S
import gsgd_jax.pathspace as P
from gsgd_jax._layout import _chain_sum, _flat
from gsgd_jax.lab import config as C
from gsgd_jax.lab import runner as R
from gsgd_jax.lab import training
from gsgd_jax.skeleton import with_skeleton

# ------------------------------------------------------------------------------------------------
# The prototype: tap-RMS balanced gauge
# ------------------------------------------------------------------------------------------------

_orig_scales, _orig_sigma = S._scales, S._sigma
_EXTRA = {}


def _tap_rms(k, m):
  nt = len(m.work.center)
  return jnp.abs(k) if nt == 0 else jnp.sqrt(jnp.mean(k * k, axis=tuple(range(nt))))


def patched_scales(chains, masks, kernels, guard=True):
  sc = _orig_scales(chains, masks, kernels, guard)
  if sc.log_rho is None:
    return sc
  c_in, c_out, r_in, r_out = [], [], [], []
  for chain, ms, ks in zip(chains, masks, kernels):
    a, b = S._skeleton_entries(chain, [k[m.work.center] for m, k in zip(ms, ks)], jnp)
    ra, rb = S._skeleton_entries(chain, [_tap_rms(k, m) for m, k in zip(ms, ks)], jnp)
    c_in.append(a); c_out.append(b); r_in.append(ra); r_out.append(rb)
  lq_in = jnp.log(jnp.abs(_flat(c_in))) - jnp.log(_flat(r_in))  # log q, incoming skeleton edges
  lq_out = jnp.log(jnp.abs(_flat(c_out))) - jnp.log(_flat(r_out))
  lqb = _chain_sum(lq_in, sc.plan.parent)  # log Q_B(u)
  lqf = _chain_sum(lq_out, sc.plan.child)  # log Q_F(u)
  _EXTRA[id(sc.log_rho)] = (sc.log_rho - lqb - lqf, lqb, lqf)
  return sc


def patched_sigma(sc, c, li, L, s, balance, fanout=1.0):
  out = _orig_sigma(sc, c, li, L, s, balance, fanout)
  extra = _EXTRA.get(id(sc.log_rho)) if sc.log_rho is not None else None
  if extra is None or S._off(balance):
    return out
  lrp, lqb, lqf = extra
  lr_in, lr_out = sc.at(lrp, c, li), sc.at(lrp, c, li + 1)
  qb_in, qf_out = sc.at(lqb, c, li), sc.at(lqf, c, li + 1)
  row = None if lr_in is None else jnp.exp(balance * ((li / L) * lr_in + qb_in))
  col = None if lr_out is None else jnp.exp(balance * (((L - 1 - li) / L) * lr_out + qf_out))
  return out._replace(row=row, col=col)


def patch(on=True):
  for mod in (S, P):
    mod._scales, mod._sigma = (patched_scales, patched_sigma) if on else (_orig_scales,
                                                                          _orig_sigma)

# ------------------------------------------------------------------------------------------------
# Diagnostics on the MNIST-1D CNN of default-mnist1d-cnn
# ------------------------------------------------------------------------------------------------

def _setup(preset="default-mnist1d-cnn", dtype=None):
  cfg = C.PRESETS[preset][0][1]
  if dtype:
    cfg = cfg.replace(dtype=dtype)
  data = R.load_data(cfg)
  model = R.build_model(cfg, data)
  x0 = data.x_train[:1]
  v0 = dict(model.init(jax.random.PRNGKey(0), jnp.asarray(x0), train=False))
  structure, _ = R.build_structure(cfg, model, v0, x0)
  return cfg, data, model, x0, structure


def centre_max(params):
  """Same init distribution, but in every (in, out) kernel slice the largest-|w| tap sits at the
  centre (swapped with the centre tap; changes the function, not the distribution)."""
  p = jax.tree_util.tree_map(np.asarray, params)
  out = {}
  for name, leaf in p.items():
    leaf = dict(leaf)
    k = np.array(leaf["kernel"])
    if k.ndim == 3:  # (taps, in, out)
      c = k.shape[0] // 2
      idx = np.abs(k).argmax(0)
      i, j = np.indices(idx.shape)
      top, cen = k[idx, i, j].copy(), k[c, i, j].copy()
      k[idx, i, j] = cen
      k[c, i, j] = top
      leaf["kernel"] = k
    out[name] = leaf
  return out


def layer1_ratios(params):
  """Layer-1 centre tap |w_c| / RMS over its taps, per output channel (one input channel: this
  is each channel's incoming skeleton edge)."""
  names = sorted(k for k in params if k.startswith("Conv"))
  k = np.asarray(params[names[0]]["kernel"])
  c = k.shape[0] // 2
  return np.abs(k[c, 0]) / np.sqrt((k[:, 0] ** 2).mean(0))


def train(setup, opt, lr, seed, init_fn=None):
  cfg, data, model, x0, structure = setup
  steps = len(data.x_train) // cfg.batch_size
  v = R.initial_variables(cfg, model, structure, x0, seed)
  if init_fn is not None:
    v = {**v, "params": init_fn(v["params"])}
  s = with_skeleton(structure, v["params"], cfg.skeleton) if opt.startswith("gsgd") else structure
  tx = R.make_optimizer(opt, s, momentum=cfg.momentum, schedule=cfg.schedule,
                        total_steps=steps * cfg.epochs, steps_per_epoch=steps)
  res = training.train_classifier(model, v, tx, data, epochs=cfg.epochs,
                                  batch_size=cfg.batch_size, seed=seed,
                                  hyperparams={"learning_rate": lr})
  return res.train_loss[-1], res.test_accuracy[-1], len(res.train_loss)


def invariance(patched):
  """Float64: one G-SGD step (lr 0.3, seed 4's init) from w and from a rescaled w."""
  from gsgd_jax.gauge import random_rescale
  from gsgd_jax.transform import gsgd
  patch(patched)
  with R._precision("float64"):
    cfg, data, model, x0, st = _setup(dtype="float64")
    x = jnp.asarray(data.x_train[:64], jnp.float64)
    y = jnp.asarray(data.y_train[:64])
    p = R.initial_variables(cfg, model, st, np.asarray(x[:1]), 4)["params"]
    s = with_skeleton(st, p, "aligned")
    q, _ = random_rescale(s, p, jax.random.PRNGKey(1), max_factor=30.0)

    def loss(pp):
      return optax.softmax_cross_entropy_with_integer_labels(
          model.apply({"params": pp}, x), y).mean()

    def step(pp):
      tx = gsgd(0.3, structure=s)
      u, _ = tx.update(jax.grad(loss)(pp), tx.init(pp), pp)
      return optax.apply_updates(pp, u)

    fa, fb = model.apply({"params": step(p)}, x), model.apply({"params": step(q)}, x)
    print("tap-RMS gauge" if patched else "library", "| max |f(step(w)) - f(step(rescaled w))|:",
          float(jnp.abs(fa - fb).max()), "| largest logit change of the step:",
          float(jnp.abs(fa - model.apply({"params": p}, x)).max()))


if __name__ == "__main__":
  mode = sys.argv[1] if len(sys.argv) > 1 else "diag"
  if mode == "diag":
    setup = _setup()
    for seed in range(5):
      v = R.initial_variables(setup[0], setup[2], setup[4], setup[3], seed)
      r = layer1_ratios(v["params"])
      print(f"seed {seed}: layer-1 centre/RMS min {r.min():.3f} (channels < 0.1: "
            f"{(r < 0.1).sum()})", flush=True)
    for seed in range(5):
      print("gsgd lr 0.3 seed", seed, "(final loss, test acc, epochs run):",
            train(setup, "gsgd", 0.3, seed), flush=True)
  elif mode == "centremax":
    setup = _setup()
    for opt, lr in (("gsgd", 0.3), ("gsgd", 1.0), ("sgd", 1.0), ("gsgd_momentum", 0.1),
                    ("sgd_momentum", 0.1)):
      for seed in range(5):
        print("centre-max init", opt, lr, seed, train(setup, opt, lr, seed, centre_max),
              flush=True)
  elif mode == "invariance":
    invariance(len(sys.argv) > 2 and sys.argv[2] == "taprms")
  elif mode == "taprms":
    patch(True)
    preset, out = sys.argv[2], sys.argv[3]
    for part, cfg in C.PRESETS[preset]:
      R.run_experiment(cfg.replace(optimizers=("gsgd", "gsgd_momentum", "gsgd_adam")),
                       f"{out}/{part}", progress=False, name=part + " (tap-RMS gauge)")
  else:
    raise SystemExit(f"unknown mode {mode!r}: diag, centremax, invariance [taprms], taprms")
