"""GPTQ (Frantar et al. 2022): the pure algorithm (algorithm.py), its config (config.py), the block-by-block method
(method.py, registered as `gptq`)."""
