#!/usr/bin/env bash
# Everything GPU-specific for kernels.factored_matmul, in one call of at most 8 minutes:
#   1. tests/kernels with the kernels compiled by Triton instead of interpreted
#      (float32 matmuls at "highest" precision, so the 1e-5 float64 tolerances hold);
#   2. python -m bench.kernels: Triton and XLA vs float64 (default precision, bf16 and
#      f32), then the timing grid, written into bench/RESULTS.md under the card's name,
#      with the proposed _dispatch.MEASURED entry and auto re-timed against XLA.
# Usage, from anywhere: bash bench/gpu_check.sh   (PY=/path/to/python to override)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import jax; d = jax.devices()[0]; print(d.device_kind); assert d.platform == 'gpu', d" || exit 1
status=0
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 "$PY" -m pytest tests/kernels -q -p no:cacheprovider || status=1
timeout 300 "$PY" -m bench.kernels --budget 150 || status=1
exit $status
