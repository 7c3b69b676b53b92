#!/usr/bin/env bash
# The W4A16 kernels on the GPU machine (issue 25): GPU tests, the kernel microbenchmark, the decode benchmark, and
# LMDeploy's engine with and without the harness's kernel. Run from the repository root with .device/ carried
# (../shared/device/prepare-lmdeploy.sh + the gemlite, hydra-core, omegaconf, antlr4, psutil wheels and the SmolLM2
# tokenizer files in .device/tokenizers/smollm2-135m-instruct/). Stages: tests kernels decode engine (any subset);
# T_TESTS, T_KERNELS, T_DECODE, T_ENGINE bound each stage in seconds.
# A full pass in three device calls (each under 10 minutes):
#   KERNEL_ARGS="--models llama2_7b llama2_13b" bash results/gpu/w4a16_on_gpu.sh tests kernels
#   DECODE_ARGS="--batches 1 4 8 32 --compile" bash results/gpu/w4a16_on_gpu.sh decode
#   ENGINE_ARGS="--variants fp16 awq_w4a16 awq_w4a16_gemlite awq_w4a16_hybrid" bash results/gpu/w4a16_on_gpu.sh engine
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:$PWD/.device/lmdeploy:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 QH_CACHE=/tmp/qhcache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for stage in "$@"; do
  t=$(date +%s)
  case $stage in
    tests) timeout ${T_TESTS:-120} python3 -m pytest -q -p no:cacheprovider tests/quant/test_w4a16_kernels.py tests/eval/test_static_decode.py \
             -k "cuda or gemlite or lmdeploy" 2>&1 | tail -15 ;;
    kernels) timeout ${T_KERNELS:-200} python3 -m benchmarks.w4a16_kernels --out "$OUT/w4a16_kernels" ${KERNEL_ARGS:-} 2>&1 | tail -40
             cp -r results/gpu/gemlite_autotune "$OUT/" 2>/dev/null ;;
    decode) timeout ${T_DECODE:-420} python3 -m benchmarks.decode_gpu --out "$OUT/decode_gpu" ${DECODE_ARGS:-} 2>&1 | grep -v Warning | tail -40 ;;
    engine) timeout ${T_ENGINE:-560} python3 -m benchmarks.lmdeploy_throughput --out "$OUT/lmdeploy_w4a16" \
              --tokenizer .device/tokenizers/smollm2-135m-instruct ${ENGINE_ARGS:-} 2>&1 | grep -v Warning | tail -40 ;;
  esac
  echo "== $stage: $(( $(date +%s) - t )) s"
done
