#!/usr/bin/env bash
# Second GPU pass of the pipeline (issue 14): the multiple-choice sweep on every item (`+sweep=mc`, 5 configs) on
# CUDA, and fidelity to FP16 through LMDeploy's kernels (`backend=lmdeploy`, engine logits against the FP16
# reference). Run from the repository root after the bundle's parts were gathered under /tmp/bundle and the wheels
# installed under /tmp/site (results/gpu/README.md); records under $OUT/gpu/runs/, logs in $OUT/gpu/logs.txt.
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
  echo "== $name: exit $? in $(( $(date +%s) - t )) s"; grep -E "token_ppl|perplexity|fidelity|acc|error|Error|wrote" /tmp/log_$name.txt | tail -8
}
run mc_sweep 300 -m +sweep=mc model.device=cuda
run awq_w4_lmdeploy_fidelity 150 quant=awq_w4 backend=lmdeploy eval=ppl eval.fidelity.enabled=true model.device=cuda
run rtn_w4_lmdeploy_fidelity 120 quant=rtn_w4 backend=lmdeploy eval=ppl eval.fidelity.enabled=true model.device=cuda
run awq_w4_cuda_fidelity 120 quant=awq_w4 eval=ppl eval.fidelity.enabled=true model.device=cuda
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
tail -c 30000 /tmp/log_*.txt > $R/logs.txt
