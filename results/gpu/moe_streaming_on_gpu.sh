#!/usr/bin/env bash
# Issue 26 on the GPU machine: quantizing without the model in host memory (quant/streaming.py). Run from the
# repository root with .device/strm (hydra-core, omegaconf, antlr4 wheels), .device/lmdeploy and .device/tokenizers
# carried. Stages (any subset, in order): 7b (the Llama-2-7B shape: in memory vs streamed from the file vs streamed
# from the seed), mixtral_awq, mixtral_gptq, qwen3_awq, qwen3_gptq (Mixtral-8x7B and Qwen3-30B-A3B shapes, random
# weights generated block by block on the GPU: no file). T_<STAGE> bounds each variant in seconds; a variant stopped by
# it leaves its finished blocks' times (quantize_gpu_<variant>.blocks.jsonl) and the table says how far it got.
set -u
# WHEELS: a folder holding those three wheels (.device/whl, which results/gpu/w4a16_on_gpu.sh carries, has them too)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ${WHEELS:-.device/strm}/hydra_core-*.whl \
  ${WHEELS:-.device/strm}/omegaconf-*.whl ${WHEELS:-.device/strm}/antlr4_*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:$PWD/.device/lmdeploy:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 QH_CACHE=/tmp/qhcache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; free -g | head -2; df -h /tmp | tail -1
Q="python3 -m benchmarks.quantize_gpu --synthetic-root /tmp/synthetic --tokenizer .device/tokenizers/smollm2-135m-instruct"
for stage in "$@"; do
  t=$(date +%s)
  case $stage in
    7b) $Q --out "$OUT/stream_7b" --timeout ${T_7B:-120} --variants ${V_7B:-harness_awq harness_awq_stream \
          harness_gptq_stream harness_awq_stream_synthetic} 2>&1 | grep -v "^block" | tail -12 ;;
    mixtral_awq) $Q --out "$OUT/stream_mixtral" --model mixtral_8x7b_moe_synthetic --timeout ${T_MIXTRAL_AWQ:-280} \
          --variants harness_awq_stream_synthetic 2>&1 | grep -v "^block [0-9]*[1-9]:" | tail -14 ;;
    mixtral_gptq) $Q --out "$OUT/stream_mixtral_gptq" --model mixtral_8x7b_moe_synthetic --timeout ${T_MIXTRAL_GPTQ:-280} \
          --variants harness_gptq_stream_synthetic 2>&1 | grep -v "^block [0-9]*[1-9]:" | tail -14 ;;
    qwen3_awq) $Q --out "$OUT/stream_qwen3" --model qwen3_30b_a3b_moe_synthetic --timeout ${T_QWEN3_AWQ:-200} \
          --variants harness_awq_stream_synthetic 2>&1 | grep -v "^block [0-9]*[1-9]:" | tail -14 ;;
    qwen3_gptq) $Q --out "$OUT/stream_qwen3_gptq" --model qwen3_30b_a3b_moe_synthetic --timeout ${T_QWEN3_GPTQ:-200} \
          --variants harness_gptq_stream_synthetic 2>&1 | grep -v "^block [0-9]*[1-9]:" | tail -14 ;;
  esac
  echo "== $stage: $(( $(date +%s) - t )) s"
done
