#!/usr/bin/env bash
# Issue 18, LMDeploy tensor parallelism: the throughput benchmark on a Llama-2-13B-shaped model with SYNTHETIC
# (random) weights, FP16 / AWQ W4A16 g128 / AWQ W4A16 g128 + KV int8, tp=1 and tp=2, batch 1, 8, 32; and
# app.serve with tp=2 answering a chat completion through the openai client.
#
# Run on the two-GPU machine (nvidia-h200-x2) from the repository root, with .device/ carried (filled by
# ../shared/device/prepare-lmdeploy.sh, plus the hydra-core/omegaconf/antlr4 wheels and
# .device/tokenizers/smollm2-32k from `python -m harness.tokenizer_trim .device/tokenizers/smollm2-135m-instruct
# .device/tokenizers/smollm2-32k --vocab 32000`), as two consecutive commands while the machine stays warm (the
# second reuses the checkpoints the first wrote under /tmp/synthetic, or writes them again):
#
#   bash results/gpu/lmdeploy_13b_tp.sh tp1   # tp=1: FP16 on GPU 0 while the two AWQ variants run on GPU 1; then serve, tp=2
#   bash results/gpu/lmdeploy_13b_tp.sh tp2   # tp=2: the three variants over both GPUs
#
# Everything a stage makes goes to /tmp/r and comes back as $OUT/r_<stage>.tgz; logs go straight to $OUT.
set -u
stage=${1:?tp1 or tp2}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/r
t_start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl
export PYTHONPATH=$PWD/.device/lmdeploy:/tmp/site PYTHONUNBUFFERED=1
{ echo "== environment before anything is set here"; env | grep -E 'NVLS|MULTICAST|NCCL|LMDEPLOY' | sort; } > /tmp/r/env_$stage.txt
# NVLink multicast stays off in every process (backends.lmdeploy also sets these for tp > 1; GPU.md: keep
# them set everywhere). LMDeploy's PyTorch engine runs tp > 1 through Ray unless told otherwise; Ray is not there.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 LMDEPLOY_EXECUTOR_BACKEND=mp
{ nvidia-smi; nvidia-smi topo -m; nvidia-smi nvlink --status | head -40; df -h /tmp; free -g; nproc; } > /tmp/r/machine_$stage.txt 2>&1
TOK=.device/tokenizers/smollm2-32k
SYN=/tmp/synthetic
COMMON=(--model llama2_13b_synthetic --name lmdeploy_throughput_13b_tp --synthetic-root $SYN --tokenizer $TOK
        "eval.throughput.batch_sizes=[1,8,32]" eval.throughput.repeats=2 eval.throughput.warmup=1)
pack() { tar czf "$OUT/r_$stage.tgz" -C /tmp/r . ; echo "[stage $stage] $(( $(date +%s) - t_start )) s"; }
trap pack EXIT

if [ "$stage" = tp1 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 360 python3 -m benchmarks.lmdeploy_throughput --variants fp16 --out /tmp/r/tp1 \
      --variant-timeout 340 "${COMMON[@]}" > "$OUT/tp1_fp16.log" 2>&1 &
  A=$!
  CUDA_VISIBLE_DEVICES=1 timeout -k 10 360 python3 -m benchmarks.lmdeploy_throughput --variants awq_w4a16 awq_w4a16_kv8 \
      --out /tmp/r/tp1b --variant-timeout 170 "${COMMON[@]}" > "$OUT/tp1_awq.log" 2>&1 &
  B=$!
  wait $A $B
  cp /tmp/r/tp1b/*_awq_*.json /tmp/r/tp1/ 2>/dev/null
  # serve with tp=2: the AWQ W4A16 + KV int8 checkpoint written above, both GPUs
  python3 -m app.serve --ask "Write one sentence about rivers." --out /tmp/r/serve_chat_13b_tp2.json \
      --server-log "$OUT/serve_13b_tp2_server.log" --tokenizer $TOK --synthetic-root $SYN --timeout 160 \
      -- model=llama2_13b_synthetic quant=awq quant.group_size=128 kv=int8 backend.tp=2 backend.max_batch_size=8 \
      > "$OUT/serve_13b_tp2.log" 2>&1 &
  S=$!
  # the environment of the server and every process under it (the engine's workers), every 10 s while it runs
  while kill -0 $S 2>/dev/null; do
    python3 -c "import json, sys; from benchmarks.lmdeploy_throughput import process_tree_env as t; print(json.dumps(t(int(sys.argv[1])), indent=1))" $S \
        > /tmp/r/serve_env.tmp 2>/dev/null && [ "$(grep -c '"pid"' /tmp/r/serve_env.tmp)" -ge "$(grep -c '"pid"' /tmp/r/serve_13b_tp2_processes.json 2>/dev/null || echo 0)" ] \
        && mv /tmp/r/serve_env.tmp /tmp/r/serve_13b_tp2_processes.json
    sleep 10
  done
  wait $S; echo "serve exit $?" >> "$OUT/serve_13b_tp2.log"
elif [ "$stage" = tp2 ]; then
  timeout -k 10 565 python3 -m benchmarks.lmdeploy_throughput --variants fp16 awq_w4a16 awq_w4a16_kv8 --out /tmp/r/tp2 \
      --variant-timeout 185 "${COMMON[@]}" backend.tp=2 > "$OUT/tp2.log" 2>&1
fi
