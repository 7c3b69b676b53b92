"""In-process models for the web page: the FP16 model and its quantized variants, checked, loaded and quantized by the
pipeline's own stages (experiments/stages.py: prepare, load, calibrate, quantize) through the content-addressed cache,
so a variant that a run already built loads in seconds and one that no run built is built once, on first use.

Variants that share quantized weights (AWQ w4 and AWQ w4 + KV int8) share one model in memory: the KV cache is per
request. Answers stream token by token from `model.generate` in a worker thread; a stop event ends it early."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, Optional

import torch

from harness.config import ModelConfig, RunConfig
from harness.labels import config_label
from app.chat_logic import Messages, SamplingSettings, Snapshot, cap_new_tokens, fit_to_context

Status = Callable[[str], None]


def variant_label(cfg: RunConfig) -> str:
    """A variant in the field's words (harness.labels): FP16, RTN w4 g64, AWQ w4 g64 (search+clip) + KV int8."""
    return config_label(cfg.quant, cfg.kv.bits, kv_format=cfg.kv.format)


class LocalModels:
    """Loaded models by weights identity (model + quant config), each built at most once, under a lock, on demand."""

    def __init__(self, model_cfg: ModelConfig, progress: bool = True):
        self.model_cfg = model_cfg
        self.progress = progress
        self._resolved = None
        self._tokenizer = None
        self._models: dict[str, torch.nn.Module] = {}
        self._prepared: dict[str, object] = {}  # weights config -> experiments.stages.Prepared
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    # ---- what is loaded and what it costs ----

    @property
    def resolved(self):
        with self._guard:
            if self._resolved is None:
                from harness.models import resolve_model

                self._resolved = resolve_model(self.model_cfg)
            return self._resolved

    @property
    def tokenizer(self):
        resolved = self.resolved
        with self._guard:
            if self._tokenizer is None:
                from harness.models import load_tokenizer

                self._tokenizer = load_tokenizer(resolved, self.model_cfg)
            return self._tokenizer

    def max_context(self) -> int:
        """The model's context (max_position_embeddings from its config.json, or a GGUF file's metadata)."""
        from harness.models import load_config

        cfg = load_config(self.resolved, self.model_cfg).to_dict()
        text = cfg.get("text_config", cfg)
        return int(text.get("max_position_embeddings") or text.get("max_sequence_length") or 2048)

    def prepared(self, cfg: RunConfig):
        """The pipeline's checks and cheap inputs for quantizing `cfg`'s weights (experiments.stages.prepare, nothing
        evaluated), once per weights config: a config the model cannot take fails here, before any weight loads."""
        key = repr((cfg.model, cfg.quant, cfg.data.add_bos))
        with self._guard:
            if key not in self._prepared:
                from experiments.stages import prepare

                self._prepared[key] = prepare(cfg, evaluate=False)
            return self._prepared[key]

    def weights_key(self, cfg: RunConfig) -> str:
        if cfg.quant.method == "fp16":
            return "fp16"
        from experiments import stages

        prep = self.prepared(cfg)
        return stages.weights_key(cfg, prep, stages.calibrate(cfg, prep))

    def state(self, cfg: RunConfig) -> str:
        """loaded | cached (quantized weights on disk) | missing (must be quantized first)."""
        key = self.weights_key(cfg)
        if key in self._models:
            return "loaded"
        if key == "fp16":
            return "cached"
        from quant import quantized_cache

        return "cached" if quantized_cache.is_cached(key) else "missing"

    def needs_calibration(self, cfg: RunConfig) -> bool:
        from quant import METHODS

        return METHODS.get(cfg.quant.method).needs_calibration

    # ---- loading and building ----

    def get(self, cfg: RunConfig, status: Status = lambda msg: None):
        """The model for `cfg`'s weights: loaded, restored from the quantized cache, or quantized now (and cached),
        through the pipeline's stages (experiments/stages.py)."""
        key = self.weights_key(cfg)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key in self._models:
                return self._models[key]
            from experiments import stages

            prep = self.prepared(cfg)
            label = variant_label(cfg)
            was = self.state(cfg)
            status(f"loading {self.model_cfg.name} for {label}")
            model = stages.load(cfg, prep)
            if cfg.quant.method != "fp16":
                status(f"{label}: restoring quantized weights from the cache" if was == "cached" else
                       f"{label}: quantizing now (not in the quantized cache yet)"
                       + ("; calibrating first" if self.needs_calibration(cfg) else ""))
                t = time.perf_counter()
                outcome = stages.quantize(cfg, model, prep, stages.calibrate(cfg, prep))
                status(f"{label}: ready in {time.perf_counter() - t:.1f} s; " + self._to_kernel(model, outcome, cfg))
            model.eval()
            self._warm_up(model)
            self._models[key] = model
            return model

    @staticmethod
    def _to_kernel(model, outcome, cfg: RunConfig) -> str:
        """W4A16 weights run in the real int4 kernel eval.throughput.kernel names (quant/kernels/w4a16.py), so the
        tokens/s a compare shows is the deployed speed, not the dense simulation's; what ran, in words."""
        from quant.kernels.w4a16 import W4A16KernelError, swap_w4a16_linears

        qtensors = getattr(outcome, "qtensors", None) or {}
        if not qtensors or cfg.eval.throughput.kernel == "dequant":
            return "dense (dequantized) weights"
        try:
            info = swap_w4a16_linears(model, qtensors, cfg.eval.throughput.kernel)
        except W4A16KernelError as e:
            return f"dense (dequantized) weights: {e}"
        return f"weights in {info['description']}"

    @staticmethod
    def _warm_up(model) -> None:
        """A first generate() pays one-off costs (kernel selection, allocator growth: several times a decode step on
        a CPU); paid here, so the first answer's tokens/s, e.g. the FP16 column of a compare, is not understated."""
        x = torch.tensor([[0, 1, 2, 3]], device=model.device)
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           temperature=None, top_p=None, top_k=None, pad_token_id=0)

    # ---- generation ----

    def prompt_ids(self, messages: Messages) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])

    def fit(self, messages: Messages, max_new_tokens: int, context_len: int) -> tuple[Messages, list[int], int, int]:
        """(messages that fit, their prompt ids, exchanges dropped, new tokens allowed); refuses a prompt that cannot fit."""
        fitted, _, dropped = fit_to_context(messages, lambda m: len(self.prompt_ids(m)), context_len)
        ids = self.prompt_ids(fitted)
        return fitted, ids, dropped, cap_new_tokens(len(ids), max_new_tokens, context_len)

    def stream(self, cfg: RunConfig, prompt_ids: list[int], settings: SamplingSettings,
               stop: Optional[threading.Event] = None) -> Iterator[Snapshot]:
        """Generate from `prompt_ids` with `cfg`'s model and KV cache; yields the answer after every token."""
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        model, tok = self.get(cfg), self.tokenizer
        stop = stop or threading.Event()
        closed = threading.Event()  # the consumer went away (generator closed): end generate too
        ids_q: queue.Queue = queue.Queue()

        class IdStreamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):  # generate() first puts the prompt, then each new token
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                for t in value.reshape(-1).tolist():
                    ids_q.put(t)

            def end(self):
                ids_q.put(None)

        class StopOnEvent(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                halt = stop.is_set() or closed.is_set()
                return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)

        input_ids = torch.tensor([prompt_ids], device=model.device)
        kw = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=settings.max_new_tokens,
                  streamer=IdStreamer(), stopping_criteria=StoppingCriteriaList([StopOnEvent()]),
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                  do_sample=settings.do_sample)
        if settings.do_sample:
            kw.update(temperature=settings.temperature, top_p=settings.top_p)
        else:  # greedy: unset the checkpoint's sampling defaults so generate does not warn about them
            kw.update(temperature=None, top_p=None, top_k=None)
        if cfg.kv.bits != 16:
            from eval.forward import cache_kwargs
            from quant.kv_cache import QuantizedKVCache

            kw.update(cache_kwargs(model, QuantizedKVCache(model.config, bits=cfg.kv.bits, fmt=cfg.kv.format)))
        failure: list[BaseException] = []

        def work():
            try:
                with torch.inference_mode():
                    model.generate(**kw)
            except BaseException as e:  # re-raised in the consumer
                failure.append(e)
                ids_q.put(None)

        snap, t0 = Snapshot(token_ids=[]), time.perf_counter()
        worker = threading.Thread(target=work, daemon=True, name="web-generate")
        worker.start()
        try:
            while (t := ids_q.get()) is not None:
                now = time.perf_counter() - t0
                if snap.first_token_s is None:
                    snap.first_token_s = now
                snap.token_ids.append(t)
                snap.n_tokens = len(snap.token_ids)
                snap.text = tok.decode(snap.token_ids, skip_special_tokens=True)
                snap.elapsed_s = now
                yield snap.copy()
        finally:
            closed.set()  # a closed generator (the person pressed Stop, or the page went away) ends generate
            worker.join()
        if failure:
            raise failure[0]
        snap.elapsed_s = time.perf_counter() - t0
        snap.finish_reason = ("length" if snap.n_tokens >= settings.max_new_tokens else
                              "stopped" if stop.is_set() else "stop")
        snap.done = True
        yield snap.copy()
