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

# Peers missing from the device image (OTT-JAX, POT) travel as wheels in .whl (carried).
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl > "$OUT/wheels.log" 2>&1 \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

stamp "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$OUT/run.log"
python3 -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'devices')" 2>&1 | tee -a "$OUT/run.log"

stamp "build the C++ extension in place"
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { stamp "BUILD FAILED"; tail -30 "$OUT/build.log"; }

stamp "GPU tests"
timeout 170 python3 -m pytest -m gpu --maxfail=8 -q -rf -p no:cacheprovider tests/test_gpu.py 2>&1 \
    | tee "$OUT/test_gpu.log" | tail -40
stamp "examples on the GPU (PyTorch CUDA tensors through DLPack)"
timeout 60 python3 examples/swav_sinkhorn.py 2>&1 | tail -3 | tee -a "$OUT/examples.log"
timeout 60 python3 examples/sela_torch.py --epochs 2 2>&1 | tail -3 | tee -a "$OUT/examples.log"

stamp "benchmarks"
BUDGET=$(( 330 - ($(date +%s) - T0) ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
timeout "$BUDGET" python3 benchmarks/gpu/bench_gpu.py --out "$OUT" --budget $(( BUDGET - 10 )) 2>&1 \
    | tee "$OUT/bench.log" | tail -60
stamp "done"
