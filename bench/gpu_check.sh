#!/usr/bin/env bash
# Everything GPU-specific for kernels.factored_matmul, in one call of at most 8 minutes:
#   1. tests/kernels with the kernels compiled by Triton instead of interpreted
#      (float32 matmuls at "highest" precision, so the 1e-5 float64 tolerances hold);
#   2. python -m bench.kernels: Triton and XLA vs float64 (default precision, bf16 and
#      f32), then the timing grid, written into bench/RESULTS.md under the card's name,
#      with the proposed _dispatch.MEASURED entry and auto re-timed against XLA;
#   3. python -m bench.llm_speed: SmolLM2-135M dense vs factorized (Budget 0.8, 0.6),
#      each with separate and fused (Llama.fused) q/k/v and gate/up projections:
#      prefill 8 x 256 and KV-cache decode 128 tokens, into its own RESULTS.md section
#      (the XLA:CPU option sets do not apply on a GPU: default options only).
# The CoLA inner-activation kernels are covered by step 1 (tests/kernels/test_inner_activation.py).
# Usage, from anywhere: bash bench/gpu_check.sh   (PY=/path/to/python to override)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import jax; d = jax.devices()[0]; print(d.device_kind); assert d.platform == 'gpu', d" || exit 1
status=0
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 "$PY" -m pytest tests/kernels -q -p no:cacheprovider || status=1
timeout 180 "$PY" -m bench.kernels --budget 120 || status=1
timeout 150 "$PY" -m bench.llm_speed --rounds 2 --options default || status=1
exit $status
