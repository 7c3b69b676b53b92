"""Evaluation stages, one registry (eval.registry.EVALUATORS): perplexity, fidelity to FP16, task accuracy, memory,
throughput. Importing the package registers every evaluator."""
from eval.registry import EVALUATORS, EvalContext, evaluator, ordered_names  # noqa: F401
from eval import perplexity  # noqa: E402,F401
from eval import word_perplexity, fidelity, tasks_eval, memory, throughput, kernel_quality  # noqa: E402,F401


import torch  # noqa: E402

from harness.models import DTYPES  # noqa: E402
from quant import METHODS  # noqa: E402


def preflight(cfg, model_config=None) -> None:
    """Fail fast, before the model is loaded or quantized, on input the enabled evaluators cannot run: an unknown or
    offline-unavailable lm-eval task (the error lists the local tasks), a batch that does not fit in free memory.
    `model_config` (a transformers config) enables the memory checks. Each evaluator repeats its own check anyway."""
    ev = cfg.eval
    if ev.tasks.enabled:
        tasks_eval.resolve_tasks(ev.tasks.names)
    if model_config is not None:
        if ev.throughput.enabled:
            throughput.check_throughput_fits(cfg, model_config)
        if ev.word_perplexity.enabled:
            memory.check_fits(model_config, ev.word_perplexity.batch_size, ev.word_perplexity.max_length, cfg.kv.bits,
                              "eval.word_perplexity.batch_size", device=cfg.model.device)
        method = METHODS.get(cfg.quant.method)
        if method.needs_calibration:  # the calibration is checked here too: it needs memory
            act_bytes = torch.finfo(DTYPES[cfg.model.dtype]).bits // 8
            memory.check_calibration_fits(model_config, cfg.quant.calib, cfg.model.device, act_bytes,
                                          method.extra_calibration_bytes(model_config, cfg.quant, act_bytes))
