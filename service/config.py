"""Server settings: pydantic-settings with precedence flags > env LORASWAP_* > YAML file > defaults.

Read once at start-up by `service.cli` (or passed to `create_app` by tests).
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

from adapters.bases import DEFAULT_DECODER, DEFAULT_ENCODER

_yaml_file: ContextVar[Path | None] = ContextVar("loraswap_yaml_file", default=None)


class MetricsSettings(BaseModel):
    max_adapter_labels: int = Field(100, ge=1, description="adapters beyond this fold into `_other_`")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASWAP_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    registry: str = Field("registry", description="local directory or any fsspec URL")
    # Empty string disables a task (e.g. a classification-only replica).
    encoder_base: str = DEFAULT_ENCODER
    decoder_base: str = DEFAULT_DECODER
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: Literal["auto", "none", "int8", "int4"] = Field(
        "auto", description="int8/int4: the bases' block linears quantized (CPU); auto: int4 where lossless and"
        " measured faster (service/engine/quantize.py); none: fp32")

    # Adapter residency (see service/router.py, slot_pool.py, host_cache.py).
    max_gpu_adapters: int = Field(32, ge=1, description="adapter slots per engine on the accelerator")
    max_cpu_adapters: int = Field(128, ge=0, description="validated adapters kept in host memory")
    max_rank: int = Field(64, ge=1)
    max_concurrent_loads: int = Field(2, ge=1)
    load_on_demand: bool = True
    preload: list[str] = Field(default_factory=list, description="adapter refs loaded at start-up")
    metrics_open: bool = Field(False, description="serve /metrics without a key even with auth on, with every"
                               " adapter name in it (for an endpoint picker that cannot send one)")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed to call the API"
                                    " (none by default: pages on other origins cannot read answers)")
    watch_interval_s: float = Field(2.0, ge=0, description="registry poll interval; 0 disables the watch")

    # Classification batching.
    max_batch_size: int = Field(64, ge=1)
    max_batch_tokens: int = Field(8192, ge=1)
    max_wait_ms: float = Field(2.0, ge=0)
    max_queue: int = Field(1024, ge=1)
    max_tenant_tokens: int = Field(1 << 18, ge=1, description="tokens one API key may have queued for"
                                   " classification, and prompt tokens in flight for generation (then 429)")
    shared_batch_tokens: int = Field(512, ge=1, description="padded tokens per classification batch while"
                                     " several API keys wait: what a newcomer waits at most for the running one")
    max_length: int = Field(256, ge=8, description="tokens per classification input (longer are truncated)")

    # Generation.
    max_num_seqs: int = Field(16, ge=1)
    max_model_len: int = Field(2048, ge=16)
    cuda_graphs: bool = Field(True, description="replay generation decode steps from CUDA graphs (GPU only)")

    # Request limits.
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_inputs: int = Field(256, ge=1)
    max_input_chars: int = Field(16384, ge=1)
    max_tokens: int = Field(1024, ge=1, description="upper bound on a request's max_tokens")
    max_concurrent_per_key: int = Field(64, ge=1)
    # Two full classification batches (max_batch_size 64) at one text per request: more admitted requests
    # only wait longer, and their event-loop work delays the 429s (benchmarks/overload.py, 429 p99 at 4x
    # overload on the 2-core EPYC: 25 ms at 128, 42-61 ms at 256, 112 ms at 512). Raise it for long streams.
    max_in_flight: int = Field(128, ge=0, description="API requests admitted at once; more are refused at the"
                               " edge with 429 + Retry-After before they wait anywhere (0: no bound)")
    request_timeout_s: float = Field(120.0, gt=0)
    grace_period_s: float = Field(30.0, ge=0, description="drain time on SIGTERM")
    # Longer than the idle timeout of clients and load balancers (often 60 s): a server that closes an idle
    # connection first races a request the client is already sending on it, which then fails unanswered.
    keep_alive_s: float = Field(75.0, gt=0, description="idle HTTP keep-alive before the server closes")

    # Auth (see service/auth.py).
    api_keys: str | None = Field(None, description="JSON list of key entries")
    api_keys_file: Path | None = None
    auth_enabled: bool | None = None

    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log_level: str = "info"

    @field_validator("preload", "cors_origins", mode="before")
    @classmethod
    def _split_csv(cls, value):
        if isinstance(value, str):  # env var form: "a,b@2"
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        sources = [init_settings, env_settings]
        if (path := _yaml_file.get()) is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_precision(self, task: str):
        """The base's dtype and quantization for `task` (service/engine/precision.py decides `auto`)."""
        from service.engine.precision import choose

        return choose(self.resolved_device(), task, self.dtype, self.quantization)


def load_settings(config_file: str | Path | None = None, **overrides) -> Settings:
    """Build settings; `overrides` are the CLI flags (highest precedence, None means unset)."""
    path = config_file or os.environ.get("LORASWAP_CONFIG")
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    token = _yaml_file.set(Path(path) if path else None)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _yaml_file.reset(token)
