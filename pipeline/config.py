"""Pipeline configuration: one small frozen dataclass per concern, validated when built.

- `JobConfig`: what to run on (data URI, store URI, model directory) and how (batch size,
  fixed actor pool size, stored feature precision, error budget);
- `StorageConfig`: how to reach object storage (endpoint, region, profile). Secrets are never
  config-file values: they come from the standard AWS environment (`AWS_ACCESS_KEY_ID`, ...) or
  are passed in code, and `repr`/`str` never show them;
- `RayConfig`: which cluster to join (empty address = start a local one), progress bars.

The attribution settings are `ctrak.config.AttributionConfig`; `pipeline/config_file.py` maps
one TOML file plus `key=value` overrides onto all four (`PipelineConfig`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Literal

from ctrak.config import DEFAULT_TOP_K, AttributionConfig
from ctrak.errors import ConfigError

FeatureDtype = Literal["float16", "float32"]
ModelDtype = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class JobConfig:
    """`data`: folder or s3:// prefix of img2dataset `.tar` shards; `store`: folder or s3://
    prefix of the feature store; `model`: a local diffusers directory on every worker.
    `actors`: fixed featurize pool size (one GPU each when the cluster has GPUs);
    `max_reject_fraction`: the error budget, rejected rows / all rows of the store, checked
    once a job has written every shard (a run over it exits non-zero; nothing is dropped);
    `max_caption_bytes`: a longer caption rejects its row (never cut): 16 KiB is 30x what a
    77-token text encoder reads, so no usable caption is refused, and one row cannot bloat a
    feature shard (the 5 MB caption found by hand); `lease_ttl_s`: how long a writer's lease
    outlives its last renewal (renewed every third of it; a crashed owner's lease expires
    after it), `lease_wait_s`: how long a second writer waits for it before refusing
    (0 = refuse at once; pipeline/lease.py); `max_worker_deaths`: featurize actor deaths with
    a row in the batch before that row is retried alone, and rejected if it kills its actor
    alone as well ("worker died N times"; pipeline/poison.py)."""

    data: str = ""
    store: str = ""
    model: str = ""
    batch_size: int = 16
    actors: int = 1
    feature_dtype: FeatureDtype = "float16"
    model_dtype: ModelDtype = "float32"
    max_reject_fraction: float = 0.01
    top_k: int = DEFAULT_TOP_K
    max_caption_bytes: int = 16384
    lease_ttl_s: float = 120.0
    lease_wait_s: float = 0.0
    max_worker_deaths: int = 3

    def __post_init__(self) -> None:
        for name in ("batch_size", "actors", "top_k", "max_caption_bytes", "max_worker_deaths"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"job.{name}={value!r} must be a positive integer")
        if self.feature_dtype not in ("float16", "float32"):
            raise ConfigError(
                f"job.feature_dtype={self.feature_dtype!r} is not one of ['float16', 'float32']"
            )
        if self.model_dtype not in ("float32", "bfloat16"):
            raise ConfigError(
                f"job.model_dtype={self.model_dtype!r} is not one of ['float32', 'bfloat16'] "
                "(the UNet's weights and activations; the DPS direction, norms, projections "
                "and the Gram stay float32/float64)"
            )
        for name in ("lease_ttl_s", "lease_wait_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise ConfigError(f"job.{name}={value!r} must be a number of seconds >= 0")
        if self.lease_ttl_s < 3:
            raise ConfigError(
                f"job.lease_ttl_s={self.lease_ttl_s!r} must be >= 3 s (renewed every third)"
            )
        if not 0.0 <= float(self.max_reject_fraction) <= 1.0:
            raise ConfigError(
                f"job.max_reject_fraction={self.max_reject_fraction!r} must lie in [0, 1]"
            )

    def require(self, *names: str) -> None:
        """Raise ConfigError naming each of `names` that is empty (e.g. job.store)."""
        missing = [f"job.{n}" for n in names if not getattr(self, n)]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} not set: give them in the config file or as "
                f"overrides, e.g. {missing[0]}=s3://bucket/prefix"
            )


@dataclass(frozen=True)
class StorageConfig:
    """Object-storage access. Empty fields fall back to the standard AWS environment:
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_PROFILE,
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, else botocore's chain.
    `retry_limit_s`: how long transient errors (refused, reset, timeout, 5xx, throttling) are
    retried with backoff before a job fails naming the endpoint (pipeline/storage.py)."""

    endpoint_url: str = ""
    region: str = ""
    profile: str = ""
    anon: bool = False
    retry_limit_s: float = 300.0
    key: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)
    token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"storage.endpoint_url={self.endpoint_url!r} must start with http:// or "
                "https://, e.g. http://127.0.0.1:8333"
            )
        if not 0 <= self.retry_limit_s < float("inf"):
            raise ConfigError(
                f"storage.retry_limit_s={self.retry_limit_s!r} must be a number of seconds >= 0"
            )
        if bool(self.key) != bool(self.secret):
            raise ConfigError("give both the access key and the secret key, or neither")

    def resolved(self) -> StorageConfig:
        """Fill empty fields from the AWS environment of this (driver) process, so workers on
        other machines reach the same endpoint with the same identity."""
        env = os.environ
        endpoint = (
            self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL", "")
        )
        region = self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION", "")
        key, secret, token = self.key, self.secret, self.token
        if not key and not self.profile and not self.anon:
            key = env.get("AWS_ACCESS_KEY_ID", "")
            secret = env.get("AWS_SECRET_ACCESS_KEY", "")
            token = env.get("AWS_SESSION_TOKEN", "")
            if not (key and secret):
                key = secret = token = ""
        return replace(
            self, endpoint_url=endpoint, region=region, key=key, secret=secret, token=token
        )

    def s3fs_options(self) -> dict:
        """Keyword arguments of `s3fs.S3FileSystem` (holds secrets: never log it)."""
        # one try per botocore call (plus one for a stale pooled connection): the retries with
        # backoff and a time limit are pipeline/storage.py's; a refused connection fails fast
        options: dict = {
            "config_kwargs": {
                "retries": {"mode": "standard", "total_max_attempts": 2},
                "connect_timeout": 10,
            }
        }
        client: dict = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            options["client_kwargs"] = client
        if self.anon:
            options["anon"] = True
        if self.profile:
            options["profile"] = self.profile
        if self.key:
            options.update(key=self.key, secret=self.secret)
            if self.token:
                options["token"] = self.token
        return options


@dataclass(frozen=True)
class RayConfig:
    """`address`: a Ray cluster to join ("auto", "ray://head:10001", "head:6379"); empty =
    RAY_ADDRESS if set, else start a local cluster. `runtime_env`: a YAML file for ray.init."""

    address: str = ""
    runtime_env: str = ""
    progress: bool = True


@dataclass(frozen=True)
class PipelineConfig:
    """Everything one `ctrak featurize|reindex|query` run reads."""

    job: JobConfig = field(default_factory=JobConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
