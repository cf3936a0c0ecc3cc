#!/usr/bin/env bash
# The prepared GPU check of issue 13: one run on a lent GPU machine, about 8 minutes.
#
#   1. pytest tests/test_cuda.py (the CUDA path against float64 references, the memory bound);
#   2. the ratio benchmark on a 4-layer Llama-7B-shaped slice (28 matrices), engine against
#      the papers' procedure: cold, cached base, all cached, rank-16 adapter;
#   3. the engine alone over all 32 layers (224 matrices): whole-model time and peaks;
#   4. one MoE layer of 32 Qwen3-30B-A3B-shaped experts (96 matrices): experts analysed in
#      groups (batched decompositions) against one pair at a time, bytes compared;
#   5. the CUDA test of tests/test_quantised.py: every quantised format dequantised on the
#      GPU (WSE_DEQUANTISE_DEVICE=cuda) to the bytes the CPU gives.
#
# Results (logs, JSON and Markdown tables) go to $OUT (default ./gpu-check-out). Each step
# has its own time limit, so a slow step still leaves the others' results.
#
# The GPU image lacks blake3 (every step), and plotly (tests/test_quantised.py imports the
# HTML report) and compressed-tensors with its dependencies (step 5 writes and reads its
# checkpoints): carry their wheels (13 MiB). Once, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl blake3==1.0.11 \
#       plotly==7.1.0 compressed-tensors==0.20.0 pydantic==2.14.4 pydantic-core==2.50.5 \
#       annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 loguru==0.7.3
# then run with carry [".whl"]:  bash benchmarks/gpu_check.sh
set -u -o pipefail
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DATA=${WSE_BENCH_DATA:-/tmp/wse-bench-data}
export WSE_CACHE_DIR=/tmp/wse-gpu-check-cache

if ! "$PY" -c "import blake3" 2>/dev/null; then
    if ls .whl/blake3-*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    else
        echo "blake3 is not installed and no wheel was carried in .whl/ (see the top of this script)" >&2
        exit 1
    fi
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/machine.txt"

start=$(date +%s)
echo "== 1. tests/test_cuda.py"
timeout 120 "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rs -s 2>&1 | tee "$OUT/test_cuda.log"
echo "   (step 1: $(( $(date +%s) - start )) s)"

echo "== 2. ratios on a 4-layer slice"
timeout 190 "$PY" -m benchmarks.run --workload llama7b-shape --device cuda --layers 4 --guard-matrices 7 \
    --data-dir "$DATA" --out "$OUT" 2>&1 | tee "$OUT/bench-slice.log"
echo "   (steps 1-2: $(( $(date +%s) - start )) s)"

echo "== 3. the engine alone over all 32 layers"
timeout 190 "$PY" -m benchmarks.run --workload llama7b-shape --device cuda --layers 32 --engine-only \
    --data-dir "$DATA" --out "$OUT" 2>&1 | tee "$OUT/bench-engine.log"
echo "   (steps 1-3: $(( $(date +%s) - start )) s)"

echo "== 4. an expert layer: grouped against one pair at a time"
timeout 80 "$PY" -m benchmarks.experts --device cuda --experts 32 --out "$OUT" 2>&1 | tee "$OUT/bench-experts.log"
echo "   (steps 1-4: $(( $(date +%s) - start )) s)"

echo "== 5. quantised formats dequantised on the GPU"
timeout 120 "$PY" -m pytest tests/test_quantised.py -k test_on_a_gpu_every_format_dequantises_to_the_same_bytes \
    -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/test_quantised_cuda.log"
echo "== done in $(( $(date +%s) - start )) s; results in $OUT"
ls -la "$OUT"
