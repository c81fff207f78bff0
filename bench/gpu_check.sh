#!/usr/bin/env bash
# One-shot GPU benchmark (issue 5): the full-size table of bench/bench.py, written to
# ${OUT:-bench}/bench_gpu.md, and the BatchNorm-scaling case (issue 11: PlainNet-34 with BN,
# reference-policy structure, gsgd(momentum) with bn_scaling None/weight/noweight against
# optax.sgd(momentum)) to ${OUT:-bench}/bench_gpu_bn.md, in under 8 minutes on an H100/H200.
# The GPU image already has jax, flax, optax and chex; the package (library and gsgd_jax.lab) is
# imported from the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT_DIR/gpu.txt" || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python -c "import jax; print(jax.devices())" | tee -a "$OUT_DIR/gpu.txt"
timeout 280 python bench/bench.py --rounds 7 --iters 20 --compare-modulo --out "$OUT_DIR/bench_gpu.md" \
  2>&1 | tee "$OUT_DIR/bench_gpu.log" || echo "bench stopped early; partial table kept" >&2
# the cost of the reference code's BatchNorm scaling (issue 11), in its own file
timeout 150 python bench/bench.py --models plainnet34bn --rounds 7 --iters 20 \
  --out "$OUT_DIR/bench_gpu_bn.md" 2>&1 | tee "$OUT_DIR/bench_gpu_bn.log" \
  || echo "BN bench stopped early" >&2
# what the compiled GPU step contains (kernel counts, bytes), for docs/performance.md
timeout 50 python bench/hlo_report.py --model mlp1024 --fusions > "$OUT_DIR/hlo_gpu.md" 2>&1 || true
