"""Evaluation stages: perplexity, fidelity to FP16, task accuracy, memory, throughput."""
