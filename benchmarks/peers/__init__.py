"""The peer benchmark (issue 29): auto-round and llm-compressor run on the same model, calibration tokens and
evaluation windows as the harness's own methods, in one run, each scored by the harness's perplexity code on the
weights the peer produced.

    python -m benchmarks.peers --quick                       # every row, tiny setting: the end-to-end check
    python -m benchmarks.peers --rows rtn_w4,llmc_gptq --settings w4g64

rows.py: the settings, the rows (harness rows are conf/quant presets by name; peer rows run a worker), the protocol,
and each peer worker's spec and command. readback.py: what a worker wrote, verified and scored. table.py: the
Markdown table. workers/: the scripts that run inside the peers' own environment (.venv-peers, or wheels on the GPU
machine: results/benchmarks/peers/on_gpu.sh); they import the peer, torch and transformers, never the harness.
"""
