"""Typed config of the web page (`python -m app.web`). Its root, conf/web.yaml, takes the same groups as a run
(model, quant, kv, ...: the model the chat tab answers with first) plus the `web` group (conf/web/: what the page
offers, where it binds). Compare variants are experiment presets (conf/experiment/*.yaml), composed here with the
page's model, so `web.compare=[fp16,rtn_w4,awq_w4_kv8]` means what `+experiment=awq_w4_kv8` means for a run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harness.config import ConfigError, FP16Config, RunConfig, _require, check_known_keys, register_schemas

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ENDPOINT = "endpoint"  # the name that puts the OpenAI-compatible endpoint among the compare columns / chat choices


@dataclass
class EndpointConfig:
    """An OpenAI-compatible server: `python -m app.serve` or `lmdeploy serve api_server`."""

    url: Optional[str] = None  # e.g. http://127.0.0.1:23333 (with or without /v1)
    model: Optional[str] = None  # model id; None = the first one GET /v1/models lists
    timeout_s: float = 60.0
    # no api_key here: keys come from the environment only (QH_API_KEYS, harness.exposure), never from a config


@dataclass
class WebConfig:
    host: str = "127.0.0.1"  # loopback only unless changed on purpose; never a public share link
    port: int = 7860
    chat: str = "local"  # local (the root config's model + quant + kv, in process) | endpoint
    # experiment presets side by side in the compare tab (FP16 reference first), plus "endpoint" for the server
    compare: list[str] = field(default_factory=lambda: ["fp16", "rtn_w4", "awq_w4", "awq_w4_kv8"])
    # a variant missing from the quantized cache is quantized on first use (RTN: seconds, AWQ: minutes on a CPU);
    # false = refuse it and name the command that builds it
    build_missing: bool = True
    system_prompt: str = ""
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    compare_max_new_tokens: int = 64
    context_len: Optional[int] = None  # None = the model's max_position_embeddings
    max_turns: int = 32  # exchanges kept in a session's history (the context still limits what is sent)
    results_globs: list[str] = field(default_factory=lambda: ["tables/*.md", "figures/*.png", "gpu/*.md", "gpu/*.png"])
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)

    def validate(self) -> None:
        _require(bool(self.host), "web.host", "must not be empty")
        _require(1 <= self.port <= 65535, "web.port", f"must be in 1..65535, got {self.port}")
        _require(self.chat in ("local", ENDPOINT), "web.chat", f"{self.chat!r} is not one of local, endpoint")
        wants_endpoint = self.chat == ENDPOINT or ENDPOINT in self.compare
        _require(not wants_endpoint or bool(self.endpoint.url), "web.endpoint.url",
                 "is needed for web.chat=endpoint or an 'endpoint' compare column (e.g. http://127.0.0.1:23333)")
        _require(len(set(self.compare)) == len(self.compare), "web.compare", f"has duplicates: {self.compare}")
        _require(0.0 <= self.temperature <= 2.0, "web.temperature", "must be in [0, 2]")
        _require(0.0 < self.top_p <= 1.0, "web.top_p", "must be in (0, 1]")
        _require(self.max_new_tokens >= 1 and self.compare_max_new_tokens >= 1, "web.max_new_tokens",
                 "max_new_tokens and compare_max_new_tokens must be >= 1")
        _require(self.context_len is None or self.context_len >= 2, "web.context_len", "must be >= 2 or null")
        _require(self.max_turns >= 1, "web.max_turns", "must be >= 1")
        _require(self.endpoint.timeout_s > 0, "web.endpoint.timeout_s", "must be > 0")


@dataclass
class WebRunConfig(RunConfig):
    web: WebConfig = field(default_factory=WebConfig)

    def validate(self) -> None:
        super().validate()
        self.web.validate()
        # the page holds each variant's model whole in memory: refuse streaming here, before any page or model loads
        _require(not self.model.stream, "model.stream",
                 "the web app loads each model whole to chat with it: use model.stream=false (streaming is for "
                 "experiments.export and experiments.run eval=none)")

    def run_config(self) -> RunConfig:
        """The run part (model, quant, kv, ...) without the page's settings."""
        return RunConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)})


@dataclass
class Variant:
    name: str  # an experiment preset, "config" (the root config's quant + kv), or "endpoint"
    label: str  # in the field's words (harness.labels): FP16, RTN w4 g64, AWQ w4 g64 (search+clip) + KV int8, endpoint <url>
    run: Optional[RunConfig]  # None for the endpoint


@dataclass
class WebSetup:
    cfg: WebRunConfig
    model_choice: str  # the model group option (for the commands the page names)
    chat: list[Variant]  # what the chat tab can answer with; the first is the default
    compare: list[Variant]  # the compare columns; the first is the reference


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def compose_web(overrides: list[str] | tuple[str, ...] = ()) -> WebSetup:
    """conf/web.yaml plus command-line overrides -> validated config and the variants it names."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from app.local_models import variant_label

    import quant  # noqa: F401  (registers every method's config: harness.config.QUANT_CONFIGS)

    register_schemas()
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="web_schema", node=WebRunConfig)
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        node = compose(config_name="web", overrides=list(overrides), return_hydra_config=True)
        model_choice = str(node.hydra.runtime.choices.get("model", "smollm2_135m"))
        with open_dict(node):
            del node["hydra"]
        check_known_keys(node, WebRunConfig)
        cfg = OmegaConf.to_object(node)
        cfg.validate()
        unknown = [p for p in cfg.web.compare if p != ENDPOINT and p not in presets()]
        if unknown:
            raise ConfigError(f"web.compare: {unknown} are not experiment presets; allowed: {presets() + [ENDPOINT]}")
        base = cfg.run_config()
        compare = []
        for name in cfg.web.compare:
            if name == ENDPOINT:
                compare.append(Variant(ENDPOINT, f"endpoint {cfg.web.endpoint.url}", None))
                continue
            preset = compose(config_name="config", overrides=[f"+experiment={name}"])
            q, kv = OmegaConf.to_object(preset.quant), OmegaConf.to_object(preset.kv)
            run = dataclasses.replace(base, quant=q, kv=kv)
            compare.append(Variant(name, variant_label(run), run))
    is_fp16 = [v.run is not None and v.run.quant.method == "fp16" and v.run.kv.bits == 16 for v in compare]
    if any(v.run is not None for v in compare) and not is_fp16[0]:
        # with local variants the reference column is FP16: divergence is measured from it
        fp16 = dataclasses.replace(base, quant=FP16Config(), kv=type(base.kv)())
        compare = [Variant("fp16", "FP16", fp16)] + [v for v, f in zip(compare, is_fp16) if not f]
    own = Variant("config", variant_label(base), base)
    local = [own] + [v for v in compare if v.run is not None and _same_weights_and_kv(v.run, base) is False]
    endpoint = [Variant(ENDPOINT, f"endpoint {cfg.web.endpoint.url}", None)] if cfg.web.endpoint.url else []
    chat = endpoint + local if cfg.web.chat == ENDPOINT else local + endpoint
    return WebSetup(cfg, model_choice, chat, compare)


def _same_weights_and_kv(a: RunConfig, b: RunConfig) -> bool:
    return dataclasses.asdict(a.quant) == dataclasses.asdict(b.quant) and (a.kv.bits, a.kv.format) == (b.kv.bits, b.kv.format)
