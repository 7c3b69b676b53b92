#!/usr/bin/env bash
# Second GPU pass of the pipeline (issues 14, 16, 17): the multiple-choice sweep on every item (`+sweep=mc`, 5 configs)
# on CUDA; fidelity to FP16 through LMDeploy's kernels (backend=lmdeploy: the engine's logits against the FP16
# reference); SmoothQuant W8A8 int8 through LMDeploy's W8A8 kernels against the harness's simulation on the same GPU;
# KV fp8 e4m3 through LMDeploy (quant_policy 16) against the harness's cache. Run from the repository root after the
# bundle's parts were gathered under /tmp/bundle, the wheels installed under /tmp/site and LMDeploy's source copied to
# /tmp/lmdeploy (results/gpu/README.md); records under $OUT/gpu/runs/, logs in $OUT/gpu/logs.txt.
set -u
export PYTHONPATH=/tmp/lmdeploy:/tmp/site PYTHONUNBUFFERED=1 QH_CACHE=/tmp/qhcache HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m harness.bundle install /tmp/bundle || exit 1
R=$OUT/gpu
mkdir -p $R
run() {  # name, limit in seconds, then the experiments.run arguments
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" python3 -m experiments.run "$@" results_dir=$R progress=false > /tmp/log_$name.txt 2>&1
  echo "== $name: exit $? in $(( $(date +%s) - t )) s"; grep -E "token_ppl|perplexity|fidelity|acc|error|Error|wrote" /tmp/log_$name.txt | tail -6
  tail -c 4000 /tmp/log_$name.txt > $R/log_$name.txt
}
run mc_sweep 200 -m +sweep=mc model.device=cuda
run sq_int8_lmdeploy 120 quant=smoothquant_w8a8 backend=lmdeploy eval=ppl model.device=cuda
run sq_int8_cuda 60 quant=smoothquant_w8a8 eval=ppl model.device=cuda
run awq_w4_lmdeploy_fidelity 120 quant=awq_w4 backend=lmdeploy eval=ppl eval.fidelity.enabled=true model.device=cuda
run kv_fp8_lmdeploy 100 kv=fp8_e4m3 backend=lmdeploy eval=ppl model.device=cuda
run kv_fp8_cuda 40 kv=fp8_e4m3 eval=ppl model.device=cuda
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
