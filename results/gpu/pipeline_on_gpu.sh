#!/usr/bin/env bash
# The pipeline on the GPU machine (no network), from the offline bundle (python -m harness.bundle): FP16 and RTN w4
# scored through LMDeploy's real kernels (backend=lmdeploy), and FP16 / RTN w4 / AWQ w4 quantized and scored on CUDA
# through transformers (model.device=cuda), to set beside the CPU records. Run from the repository root after the
# bundle's parts and the wheels have been gathered (see results/gpu/README.md); writes records under $OUT/gpu/runs/.
set -u
export PYTHONPATH=/tmp/lmdeploy:/tmp/site PYTHONUNBUFFERED=1 QH_CACHE=/tmp/qhcache HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m harness.bundle install /tmp/bundle || exit 1
R=$OUT/gpu
step() {  # name, limit in seconds, then the experiments.run overrides
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" python3 -m experiments.run "$@" results_dir=$R progress=false > /tmp/log_$name.txt 2>&1
  echo "== $name: exit $? in $(( $(date +%s) - t )) s"; grep -E "token_ppl|perplexity|error|Error|wrote" /tmp/log_$name.txt | tail -4
}
step fp16_lmdeploy 150 quant=fp16 backend=lmdeploy eval=ppl
step rtn_w4_lmdeploy 150 quant=rtn_w4 backend=lmdeploy eval=ppl
step fp16_cuda 60 quant=fp16 model.device=cuda eval=ppl
step rtn_w4_cuda 60 quant=rtn_w4 model.device=cuda eval=ppl
step awq_w4_cuda 150 quant=awq_w4 model.device=cuda eval=ppl
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python3 -m benchmarks.kv_lmdeploy_check --out $OUT/gpu > /tmp/log_kv.txt 2>&1; echo "== kv check: exit $?"; tail -12 /tmp/log_kv.txt
tail -c 20000 /tmp/log_*.txt > $OUT/gpu/logs.txt
