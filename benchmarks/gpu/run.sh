#!/usr/bin/env bash
# The one device script: build, GPU tests, benchmarks.  Usage (repository root, on a machine
# with a CUDA GPU, CuPy and optionally PyTorch / OTT-JAX):  bash benchmarks/gpu/run.sh
# Writes logs and results under $OUT (default: ./gpu_out).  Keeps well under 5 minutes.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
T0=$(date +%s)
stamp() { echo "[run.sh] $(( $(date +%s) - T0 )) s: $*" | tee -a "$OUT/run.log"; }

stamp "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/run.log"
python3 -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'devices')" 2>&1 | tee -a "$OUT/run.log"

stamp "build the C++ extension in place"
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { stamp "BUILD FAILED"; tail -30 "$OUT/build.log"; }

stamp "GPU tests"
timeout 150 python3 -m pytest -m gpu --maxfail=8 -q -rf -p no:cacheprovider tests/test_gpu.py 2>&1 \
    | tee "$OUT/test_gpu.log" | tail -40
stamp "quick CPU subset + NVRTC compile check"
timeout 60 python3 -m pytest -x -q -p no:cacheprovider tests/test_nvrtc.py \
    $(ls tests/test_api*.py tests/test_core*.py 2>/dev/null | head -2) -m "not slow and not gpu" 2>&1 \
    | tee "$OUT/test_cpu.log" | tail -8

stamp "benchmarks"
BUDGET=$(( 285 - ($(date +%s) - T0) ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
timeout "$BUDGET" python3 benchmarks/gpu/bench_gpu.py --out "$OUT" --budget $(( BUDGET - 10 )) 2>&1 \
    | tee "$OUT/bench.log" | tail -60
stamp "done"
