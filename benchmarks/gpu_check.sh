#!/usr/bin/env bash
# What needs a GPU, and only that (a lent GPU's time is short and starts from a bare machine):
# builds lrfuse._C with its CUDA kernels in place against that python3 (no pip, no venv), runs
# the CUDA-marked tests (everything else runs in CI on the CPU), then the CUDA step benchmark
# with `large` at 1e9 parameters. Each stage prints its time.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR] [build] [test] [bench]   (default: all three)
#
# Logs, bench_cuda.json and bench_cuda.png go to RESULTS_DIR (default benchmarks/results). The
# build is incremental, so `... build test` and then `... build bench` split the work in two.
set -uo pipefail
cd "$(dirname "$0")/.."
results="${1:-benchmarks/results}"
shift || true
stages="${*:-build test bench}"
mkdir -p "$results"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0

if [[ " $stages " == *" build "* ]]; then
  echo "== build ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"
  # LRFUSE_CUDA=1: no silent CPU-only build; the architectures are the visible GPU's.
  LRFUSE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace >"$results/build.log" 2>&1 \
    || { tail -40 "$results/build.log"; echo "build failed"; exit 1; }
  "$PY" -c 'import lrfuse._C as c, torch; assert c.with_cuda and torch.cuda.is_available(), "no CUDA kernels or no GPU"; print("built:", torch.cuda.get_device_name())' \
    || exit 1
  echo "== build done at ${SECONDS}s"
fi

if [[ " $stages " == *" test "* ]]; then
  echo "== tests"
  ignore=()
  # The CLI tests need jsonargparse, which such a machine may lack; everything else runs.
  "$PY" -c 'import jsonargparse' 2>/dev/null || { ignore=(--ignore=tests/lightning/test_cli.py); echo "(no jsonargparse: CLI tests left out)"; }
  "$PY" -m pytest -q -p no:cacheprovider -m cuda tests "${ignore[@]}" 2>&1 | tee "$results/test_cuda.log"
  (( PIPESTATUS[0] == 0 )) || status=1
  echo "== tests done at ${SECONDS}s"
fi

if [[ " $stages " == *" bench "* ]]; then
  echo "== benchmark"
  # `large` at 1e9 parameters (issue 5's size): all implementations of a row stay alive, ~64 GB
  # with the measured step (--stats, issue 21; STATS= leaves it out, ~48 GB).
  # The optimizers torch also has a fused CUDA step for; every workload.
  "$PY" benchmarks/bench_step.py --device cuda --large-params "${LARGE_PARAMS:-1e9}" ${STATS---stats} \
    --optimizers "${OPTIMIZERS:-FusedAdam,FusedAdamW,FusedSGD}" \
    --json "$results/bench_cuda.json" --plot "$results/bench_cuda.png" 2>&1 | tee "$results/bench.log"
  (( PIPESTATUS[0] == 0 )) || status=1
  echo "== benchmark done at ${SECONDS}s"
fi
exit $status
