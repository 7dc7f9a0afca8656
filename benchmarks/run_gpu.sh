#!/usr/bin/env bash
# The GPU checks and figures behind benchmarks/RESULTS.md, in one run on a CUDA machine.
#
#   bash benchmarks/run_gpu.sh OUTDIR
#
# 1. the tests that need a GPU (pytest -m gpu: torch engine, demo, bench and training on CUDA);
# 2. bosam bench of the torch engine (sam-med3d, random weights) on the GPU in fp32/bf16/fp16
#    and on the machine's CPU, the encoder attention, the training step and segment's stage
#    breakdown on the GPU;
# 3. the whole suite with a GPU present (defaults pick CUDA there), in parallel when pytest-xdist
#    is installed.
# Each step's output goes to OUTDIR/<step>.txt as well as to the terminal; a failing step does
# not stop the others, and the script exits non-zero if any failed.
set -uo pipefail
out=${1:?usage: run_gpu.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 COLUMNS=160
status=0
step() {
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}
py=${PYTHON:-python3}
step machine "$py" -c "import torch, platform; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), platform.processor() or platform.machine(), __import__('os').cpu_count(), 'CPUs')"
step gpu_tests "$py" -m pytest -q -m gpu -p no:cacheprovider tests
for p in fp32 bf16 fp16; do
    step "bench_cuda_$p" "$py" -m bosam_cli bench --engine torch --device cuda --precision "$p" --preset sam-med3d --repeats 10 --decoder-repeats 50
done
step bench_cpu "$py" -m bosam_cli bench --engine torch --device cpu --preset sam-med3d --repeats 3 --decoder-repeats 20
step encoder_cuda "$py" benchmarks/encoder.py --device cuda --repeats 10
step train_step_cuda_fp16 "$py" benchmarks/train_step.py --device cuda --precision fp16 --repeats 5
step train_step_cuda_fp32 "$py" benchmarks/train_step.py --device cuda --precision fp32 --repeats 5
step train_step_tiny_cuda "$py" benchmarks/train_step.py --preset tiny --clicks 8 --device cuda --precision fp16 --repeats 5
step segment_cuda "$py" benchmarks/segment.py --device cuda --threads 8 --repeats 3
xdist=()
"$py" -c "import xdist" 2>/dev/null && xdist=(-n 8)
step suite "$py" -m pytest -q -p no:cacheprovider "${xdist[@]}" tests
exit $status
