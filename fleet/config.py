"""fleet's configuration: one pydantic tree, loaded from ``fleet.yaml``.

Lookup order: ``--config PATH``, then ``$FLEET_CONFIG``, then ``./fleet.yaml``,
then the embedded defaults (everything under ``./fleet-data``).
``$FLEET_DATA_DIR``, ``$FLEET_DB_URL`` and ``$FLEET_STORE_URI`` override the
data directory, the registry URL and the adapter store URI.

Every field has a default and a docstring; ``fleet init`` writes them all out as
a commented YAML file. Paths are made absolute at load time because Ray workers
run in other working directories.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError

from fleet.errors import ConfigError

ENV_CONFIG = "FLEET_CONFIG"
ENV_DATA_DIR = "FLEET_DATA_DIR"
ENV_DB_URL = "FLEET_DB_URL"
ENV_STORE_URI = "FLEET_STORE_URI"
DEFAULT_DATA_DIR = "fleet-data"
DEFAULT_CONFIG_NAME = "fleet.yaml"

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The password of a URL: scheme://user:PASSWORD@host (up to the last '@' before the host's path).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):[^\s/]*@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (errors, logs, output)."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def strip_password(url: str) -> str:
    """The URL without its password (``postgresql://u:pw@h/db`` → ``postgresql://u@h/db``)."""
    return _URL_PASSWORD.sub(r"\g<head>@", url)


def store_uri_problem(uri: str) -> str | None:
    """What is wrong with an adapter store URI, or None. ``file://`` takes an absolute path and no
    host: ``file://adapters`` or ``file://./x`` would silently mean ``/`` or ``/x``."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            return (
                f"store URI {uri!r} names the host {parsed.netloc!r}; a local store is "
                "file:///absolute/path (three slashes; relative paths are not accepted)"
            )
        if not parsed.path.startswith("/"):
            return f"store URI {uri!r}: a local store is file:///absolute/path"
        return None
    if parsed.scheme == "s3":
        return None if parsed.netloc else f"store URI {uri!r} must look like s3://bucket/prefix"
    return f"store URI {redact(uri)!r}: use file:///absolute/path or s3://bucket/prefix"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class RegistryConfig(_Section):
    url: str | None = None
    """SQLAlchemy URL of the registry. Empty: sqlite:///<data_dir>/fleet.db. Production: postgresql+psycopg://user@host/db."""
    busy_timeout_ms: int = Field(30_000, ge=0)
    """SQLite: how long a writer waits for the lock before failing."""
    pool_size: int = Field(5, ge=1)
    """PostgreSQL: connections kept open per process."""
    connect_attempts: int = Field(4, ge=1)
    """How many times to try reaching the database before giving up with an error naming it."""
    echo: bool = False
    """Log every SQL statement (debugging only)."""


class StoreConfig(_Section):
    uri: str | None = None
    """Where adapter versions live: file:///path or s3://bucket/prefix. Empty: file://<data_dir>/adapters."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, moto). Empty: AWS's own."""
    region: str = "us-east-1"
    """S3 region."""
    max_attempts: int = Field(5, ge=1)
    """S3 attempts per request (exponential backoff between them)."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """S3 connect timeout per attempt."""
    multipart_threshold_mb: int = Field(64, ge=5)
    """Objects larger than this are uploaded in parts."""
    multipart_chunk_mb: int = Field(16, ge=5)
    """Size of each multipart part."""

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        problem = store_uri_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value


class BaseModelConfig(_Section):
    path: str | None = None
    """Hugging Face causal-LM directory of the shared base. Empty: <data_dir>/base (the tiny offline base, built by `fleet base build`)."""
    name: str = "fleet-tiny-llama"
    """Name the base is registered under; every model records the base it was trained on. Not set
    while base.path is: the name in that directory's fleet_base.json (`fleet base import` writes
    it), else this default."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype. auto: float32 on CPU, bfloat16 on CUDA."""
    device: str = "auto"
    """torch device. auto: cuda when a GPU is visible to the process, else cpu."""


class LoraConfig(_Section):
    rank: int = Field(8, ge=1, le=256)
    """Rank r of every new adapter."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha; the delta is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha/sqrt(r)."""
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linear modules that carry adapters (names as in the base model)."""
    max_slots: int = Field(512, ge=4)
    """Adapter slots per engine (per replica or per training worker)."""


class LearningSchedule(_Section):
    lr: float = Field(3e-3, gt=0, le=1.0)
    """Peak learning rate."""
    warmup_steps: int = Field(2, ge=0)
    """Linear warm-up steps."""
    decay: Literal["constant", "linear", "cosine"] = "cosine"
    """Shape after warm-up."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Floor of the decay as a fraction of lr."""
    steps: int = Field(24, ge=1)
    """Optimizer steps per training run."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on adapter weights."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Per-member gradient-norm clip."""
    rank: int | None = Field(None, ge=1, le=256)
    """Rank of new adapters for this tier (empty: lora.rank)."""
    replay_fraction: float = Field(0.25, ge=0, le=1)
    """Share of older (already learned) items replayed with new ones."""
    kl_weight: float = Field(0.5, ge=0)
    """Weight of the KL penalty toward the base on general-text rows (replay of public-domain text in
    every pack): keeps the base's general behaviour without fighting the private rows. 0: no replay."""
    distill_weight: float = Field(0.5, ge=0)
    """Weight of context distillation on generated answers: KL to the base's top-k with the document
    in its prompt, beside the cross-entropy on the answer's tokens."""


class DriftCaps(_Section):
    max_kl: float = Field(2.0, gt=0)
    """Hard cap on mean per-token KL(base || model) on the probe set, nats."""
    max_rel_weight_norm: float = Field(1.0, gt=0)
    """Hard cap on ||ΔW||_F / ||W0||_F aggregated over modules."""
    min_top1_agreement: float = Field(0.2, ge=0, le=1)
    """Hard floor on top-1 agreement with the base on the probe set."""
    max_general_dnll: float = Field(0.1, gt=0)
    """Hard cap on the rise of NLL on general held-out text (forgetting), nats/token: a version
    that forgets more than this is not published."""


class TierConfig(_Section):
    min_interval_s: float = Field(600.0, ge=0)
    """A model of this tier trains at most once per interval."""
    min_pending_tokens: int = Field(1, ge=1)
    """A model needs at least this many new tokens to be scheduled."""
    schedule: LearningSchedule = Field(default_factory=LearningSchedule)
    """Default learning schedule (a sweep with --apply stores a newer one in the registry)."""
    drift: DriftCaps = Field(default_factory=DriftCaps)
    """Hard drift caps; the population rule (mean + k·σ) applies on top."""
    weight: float = Field(1.0, gt=0)
    """Relative priority of this tier in the scheduler's urgency."""


def _default_tiers() -> dict[str, TierConfig]:
    return {
        "company": TierConfig(min_interval_s=3600.0, weight=1.0),
        "team": TierConfig(min_interval_s=1800.0, weight=1.0),
        "individual": TierConfig(min_interval_s=600.0, weight=1.0),
    }


class DataConfig(_Section):
    context_length: int = Field(128, ge=16)
    """Tokens per training chunk; also the longest prompt the tiny base serves."""
    heldout_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of a model's chunks held out to gate publication."""
    repeated_query_min_members: int = Field(3, ge=2)
    """A query asked by this many members of a team (teams of a company) becomes the parent's data."""
    max_text_chars: int = Field(200_000, ge=1)
    """Longest text accepted in one context item."""


class TrainConfig(_Section):
    rows_per_member: int = Field(4, ge=1)
    """Private rows each member contributes to one packed step."""
    general_rows_per_member: int = Field(1, ge=0)
    """General-text rows (KL toward the base only) each member adds to a step; 0: none."""
    chat_rows_per_member: int = Field(1, ge=0)
    """On an instruct base, rows of the base's own answers to general instructions (KL toward the
    base only, on the answer's tokens) each member adds to a step; 0: none. More of them, with a
    higher ``kl_weight``, keep more of the base's general answers at some cost in recall (README)."""
    augment: Literal["auto", "base", "template", "off"] = "auto"
    """Training forms of documents: base (the base writes questions, answers them with the document
    in context, paraphrases it), template (X is Y → What is X?, for the tiny base), off. auto: base
    for a real instruct base, template for the tiny one."""
    eval_every: int = Field(4, ge=0)
    """Steps between checks of each member's held-out-question recall (0: no early stop)."""
    stop_recall: float = Field(0.9, ge=0, le=1)
    """A member stops training once this share of its held-out questions is answered (greedy)."""
    checkpoint_every: int = Field(20, ge=1)
    """Steps between checkpoints (all members' adapters and optimizer states)."""
    max_failures: int = Field(2, ge=1)
    """Ray Train restarts a failed run from its last checkpoint this many times."""
    storage_path: str | None = None
    """Where Ray Train keeps run checkpoints: a path or s3://… Empty: <data_dir>/runs."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs per training worker when no GPU slice is assigned."""
    min_heldout_improvement: float = Field(0.0, ge=0)
    """Gate: held-out loss must fall by more than this (nats) to publish."""
    seed: int = 0
    """Seed for data order and fresh adapter initialisation."""
    start_timeout_s: float = Field(900.0, gt=0)
    """A pack run whose worker cannot be placed for this long, while none of its cycle's packs is
    training, fails with what it asked for and what the cluster has free (instead of waiting forever)."""
    controller_poll_s: float = Field(0.25, gt=0, le=60)
    """How often Ray Train's controller polls a pack's workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S).
    Ray's default, 2 s, adds seconds to the start and end of every pack's run."""


class SliceSpec(_Section):
    profile: str
    """Slice type: a GPU (h100-80gb, a100-80gb, a10g, …) or full, frac-<f> (0<f<1), a MIG profile (1g.10gb …), or cpu; '<gpu>:<profile>' also works."""
    count: int = Field(1, ge=0)
    """How many slices of this type the cluster has."""
    gpu: str | None = None
    """Card of full, frac-<f> and MIG profiles (empty: implied; a bare MIG profile means the slowest card that has it)."""
    node: str | None = None
    """Node the slices are on (a placement hint in the plan; empty: any)."""
    memory_gb: float | None = Field(None, gt=0)
    """Memory per slice (empty: the profile's known value)."""
    speed: float | None = Field(None, gt=0)
    """Relative speed (a full H100 = 1.0; empty: the profile's known value)."""


class SchedulerConfig(_Section):
    cycle_s: float = Field(600.0, gt=0)
    """Length of one scheduling cycle."""
    cycle_heartbeat_s: float = Field(30.0, gt=0)
    """A running cycle records that it is alive this often. One silent for 4× this is taken as
    interrupted (its job died); no new cycle starts while one is alive."""
    usage_half_life_s: float = Field(7 * 86400.0, gt=0)
    """Half-life of the decayed usage in the fair-share factor F = 2^(-U/S)."""
    reserve_serving_fraction: float = Field(0.25, ge=0, lt=1)
    """Share of slices kept for serving, never given to training."""
    aging_bound_cycles: int = Field(12, ge=1)
    """Every model with pending data is scheduled within this many cycles, even under overload."""
    default_company_budget_gpu_s_per_day: float | None = Field(None, gt=0)
    """GPU-seconds per day a company may use (empty: unlimited); idle capacity may be borrowed beyond it."""
    max_pack_members: int = Field(64, ge=1)
    """Most members one pack may hold."""
    tokens_per_gpu_s: float = Field(20_000.0, gt=0)
    """Learning throughput of a full slice (speed 1.0): tokens of new data learned per second (each trained on for a schedule's several passes)."""
    pack_overhead_s: float = Field(15.0, ge=0)
    """Start-up cost of one pack's training run (Ray Train), charged to the slice, not to companies."""
    min_member_tokens: int = Field(512, ge=1)
    """Smallest budget a member is given when budgets are cut to fit a slice."""
    max_member_tokens: int | None = Field(None, ge=1)
    """Most tokens one model trains per cycle (empty: an eighth of a full GPU's cycle); larger backlogs take several cycles."""
    borrow_idle: bool = True
    """Lend capacity that in-budget demand leaves idle to companies beyond their budget."""
    age_weight: float = Field(1.0, ge=0)
    """Weight of pending data's age against the fair-share factor (0: fair share alone)."""
    inventory: list[SliceSpec] = Field(default_factory=list)
    """Slices to plan over. Empty: read from the Ray cluster (CPU slices stand in without GPUs)."""


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    app_name: str = "fleet"
    """Serve application name."""
    replicas: int = Field(1, ge=1)
    """Model replicas per base model (the minimum when autoscaling)."""
    max_replicas: int = Field(1, ge=1)
    """Autoscaling ceiling (equal to replicas: no autoscaling)."""
    target_ongoing_requests: float = Field(32.0, gt=0)
    """Autoscaling target per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPU fraction per model replica (0 on CPU-only clusters)."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs per model replica."""
    adapter_slots: int = Field(256, ge=4)
    """Adapters each replica keeps loaded (LRU beyond it)."""
    max_batch_size: int = Field(64, ge=1)
    """Most rows in one decode step."""
    batch_wait_ms: float = Field(2.0, ge=0)
    """How long a step waits for more requests to join."""
    max_queue: int = Field(1024, ge=1)
    """Queued requests per replica before answering 503."""
    max_new_tokens: int = Field(256, ge=1)
    """Ceiling on max_tokens per request."""
    rate_limit_rps: float = Field(100.0, gt=0)
    """Requests per second per company (token bucket)."""
    rate_limit_burst: int = Field(200, ge=1)
    """Token-bucket burst per company."""
    stack_cache_s: float = Field(1.0, ge=0)
    """How long a resolved stack is reused before the registry is asked again (promotion latency)."""
    company_rate_limits: dict[str, float] = Field(default_factory=dict)
    """Per-company requests per second overriding rate_limit_rps (company id → rate); the burst scales with it."""
    max_inflight_per_company: int = Field(64, ge=1)
    """Requests one company may have waiting or running, per model replica and per ingress replica (429 past it)."""
    company_inflight_limits: dict[str, int] = Field(default_factory=dict)
    """Per-company in-flight limits overriding max_inflight_per_company (company id → requests)."""
    company_batch_share: float = Field(0.5, gt=0, le=1)
    """Share of a decode step's rows one company may hold while another company has requests running or
    waiting on the replica (at least one row; alone, a company may fill the batch)."""
    step_tokens: int = Field(256, ge=1)
    """Prompt tokens (prefills of joining requests and scoring passes) one decode step takes in, at least one request."""
    stream_messages_per_s: float = Field(100.0, gt=0)
    """Stream messages a model replica sends per second, shared by its open streams (one per open streams ÷ this seconds each, at most 1 s apart; the first text and the end at once)."""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body; a bigger one is refused with 413 before it is read (Content-Length) or as soon as it passes."""
    preauth_rps: float = Field(20.0, gt=0)
    """Key checks per second one client address may cause (unknown keys, lookups of keys not seen valid lately)."""
    preauth_burst: int = Field(40, ge=1)
    """Burst of the per-address key-check bucket."""
    bad_key_cache_s: float = Field(10.0, ge=0)
    """How long an unknown key prefix (or a wrong key) is answered 401 without asking the registry."""

    @field_validator("company_rate_limits")
    @classmethod
    def _positive_rates(cls, rates: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in rates.items() if not v > 0}
        if bad:
            raise ValueError(f"rates must be positive requests per second, got {bad}")
        return rates

    @field_validator("company_inflight_limits")
    @classmethod
    def _positive_limits(cls, limits: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in limits.items() if v < 1}
        if bad:
            raise ValueError(f"in-flight limits must be at least 1 request, got {bad}")
        return limits


class DivergenceConfig(_Section):
    probe_prompts: int = Field(16, ge=2)
    """Prompts in a generated probe set (fact-style prompts, then general held-out text)."""
    probe_general: int = Field(8, ge=1)
    """Of the probe prompts, how many are general held-out text: ΔNLL (forgetting) is measured on these."""
    probe_tokens: int = Field(64, ge=8)
    """Tokens per probe prompt."""
    top_k: int = Field(32, ge=1)
    """Base log-probabilities cached per token: top-k plus tail mass."""
    population_sigma: float = Field(3.0, gt=0)
    """Population rule: flag a model above mean + k·σ of its tier's accepted models."""
    min_population: int = Field(20, ge=2)
    """The population rule applies once a tier has this many scored models."""
    freeze_after: int = Field(3, ge=1)
    """Consecutive drift strikes (warn, rollback, reject) after which a model stops training (frozen)."""
    batch_models: int = Field(4, ge=1)
    """Models scored per forward pass (each brings probe_prompts rows). CPU: 2-4 keep activations in cache; a GPU wants 64 or more."""
    watch_every_s: float = Field(600.0, gt=0)
    """Default interval of `fleet drift watch`."""

    @model_validator(mode="after")
    def _general_within_probes(self) -> DivergenceConfig:
        if self.probe_general >= self.probe_prompts:
            raise ValueError(
                "divergence.probe_general must be smaller than probe_prompts (fact-style prompts need rows too)"
            )
        return self


class RayConfig(_Section):
    address: str | None = None
    """Ray cluster to join (ray://… or an address). Empty: start a local Ray."""
    namespace: str = "fleet"
    """Ray namespace of fleet's jobs, actors and Serve app."""
    dashboard_url: str = "http://127.0.0.1:8265"
    """Jobs API / dashboard address for job submission."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local Ray (empty: all)."""


class SweepConfig(_Section):
    kl_lambda: float = Field(2.0, ge=0)
    """Objective (minimised) = share of held-out questions missed + λ·max(0, ΔNLL on general text)
    (held-out loss instead of the missed share for members without held-out questions)."""
    report_every: int = Field(5, ge=1)
    """Steps between reports to Tune (ASHA decides on these)."""


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")
_CRON_FIELD = re.compile(r"^[0-9*/,\-A-Za-z?]+$")


class DeployNodeType(_Section):
    gpu: str = "A10G"
    """GPU model: A10G, L4, L40S, A100-40GB, A100-80GB, H100, H200, or none (a CPU-only node)."""
    gpus: int = Field(1, ge=0)
    """Physical GPUs per node (0 with gpu: none)."""
    mig_profiles: list[str] = Field(default_factory=list)
    """MIG instances of one profile each GPU gives this node type, e.g. [3g.40gb, 3g.40gb]; empty: whole GPUs. Each instance is a Ray GPU plus one unit of fleet_slice_<profile>."""
    roles: list[Literal["serve", "train"]] = Field(default_factory=lambda: ["serve", "train"])
    """What this type runs on Kubernetes: serve (RayService workers), train (training RayCluster). The launcher's one cluster has every type."""
    min_workers: int = Field(0, ge=0)
    """Nodes kept up (launcher) and serving pods kept up (RayService); the training RayCluster always scales to zero."""
    max_workers: int = Field(4, ge=0)
    """Most nodes (launcher) or pods (Kubernetes) of this type."""
    instance_type: str = "g5.8xlarge"
    """AWS instance type (cluster launcher)."""
    disk_gb: int = Field(500, ge=50)
    """Root volume of a launcher node, GiB (image, base model, caches)."""
    cpus: int = Field(30, ge=1)
    """CPUs of a Kubernetes pod of this type (request = limit); one pod per node, sized to its allocatable CPUs."""
    memory_gb: int = Field(110, ge=1)
    """Memory of a Kubernetes pod of this type, GiB (request = limit)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Kubernetes node labels a pod of this type requires. Empty: nvidia.com/gpu.product of the GPU model."""

    @model_validator(mode="after")
    def _check(self) -> DeployNodeType:
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) exceeds max_workers ({self.max_workers})")
        if self.gpu == "none" and (self.gpus or self.mig_profiles):
            raise ValueError("gpu: none takes gpus: 0 and no mig_profiles")
        if self.gpu != "none" and self.gpus < 1:
            raise ValueError(f"gpu: {self.gpu} needs gpus >= 1 (or gpu: none for a CPU-only node)")
        if not self.roles:
            raise ValueError("roles must name serve, train or both")
        return self


def _default_node_types() -> dict[str, DeployNodeType]:
    return {
        "a10g": DeployNodeType(
            gpu="A10G",
            gpus=1,
            instance_type="g5.8xlarge",
            cpus=30,
            memory_gb=110,
            min_workers=1,
            max_workers=8,
            roles=["serve", "train"],
        ),
        # Every H100 split in two 40 GB instances (the GPU operator's all-3g.40gb layout).
        "h100": DeployNodeType(
            gpu="H100",
            gpus=8,
            mig_profiles=["3g.40gb", "3g.40gb"],
            instance_type="p5.48xlarge",
            disk_gb=1000,
            cpus=180,
            memory_gb=1800,
            min_workers=0,
            max_workers=2,
            roles=["train"],
        ),
    }


def _default_overlays() -> dict[str, dict[str, Any]]:
    return {
        # A laptop cluster (kind, minikube): CPU pods only, the tiny base, slow cron.
        "dev": {
            "deploy": {
                "namespace": "fleet-dev",
                "image": "fleet:dev",
                "serve_gpus": 0.0,
                "head_cpus": 2,
                "head_memory_gb": 8,
                "cron_schedule": "*/30 * * * *",
                "node_types": {
                    "a10g": None,
                    "h100": None,
                    "cpu": {
                        "gpu": "none",
                        "gpus": 0,
                        "instance_type": "m5.2xlarge",
                        "cpus": 2,
                        "memory_gb": 8,
                        "min_workers": 1,
                        "max_workers": 2,
                        "roles": ["serve", "train"],
                    },
                },
            },
            "serve": {"replicas": 1, "max_replicas": 1},
        },
        "prod": {
            "deploy": {
                "node_types": {"a10g": {"min_workers": 2, "max_workers": 16}, "h100": {"max_workers": 4}}
            },
            "serve": {"replicas": 2, "max_replicas": 16},
        },
    }


class DeployConfig(_Section):
    name: str = "fleet"
    """Name of the clusters and prefix of every Kubernetes object (fleet, fleet-train, fleet-cycle, fleet-config)."""
    namespace: str = "fleet"
    """Kubernetes namespace."""
    ray_version: str = "2.60.0"
    """Ray version of every image; must equal the Ray that submits to the cluster."""
    ray_image: str | None = None
    """Image of the launcher's nodes. Empty: rayproject/ray:<ray_version>-py311-gpu."""
    image: str = "fleet:0.1.0"
    """Image of the Kubernetes pods: the Ray image with fleet installed (k8s/Dockerfile)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Kubernetes imagePullPolicy of every container."""
    package_source: str = "."
    """What the launcher's nodes pip-install: a local path (., /…, ~/…; a directory or wheel, copied by file_mounts) or a pip requirement such as 'fleet @ git+https://host/org/fleet@v0.1.0'."""
    env_file: str = "~/.fleet/cluster.env"
    """Launcher: local KEY=value file (FLEET_DB_URL, FLEET_STORE_URI, AWS_* keys) copied to every node and exported before ray start. Never committed."""
    aws_region: str = "us-east-1"
    """Launcher: AWS region of the nodes."""
    aws_instance_profile_arn: str | None = None
    """Launcher: IAM instance profile of every node (S3 access without keys). Empty: Ray's default profile."""
    ssh_user: str = "ubuntu"
    """Launcher: SSH user of the node image."""
    head_instance_type: str = "m5.2xlarge"
    """Launcher: AWS instance type of the CPU head."""
    head_cpus: int = Field(4, ge=1)
    """Kubernetes: CPUs of a head pod (request = limit)."""
    head_memory_gb: int = Field(16, ge=2)
    """Kubernetes: memory of a head pod, GiB (request = limit)."""
    node_types: dict[str, DeployNodeType] = Field(default_factory=_default_node_types)
    """Worker node types (launcher) and worker groups (KubeRay), keyed by name."""
    idle_timeout_s: int = Field(600, ge=0)
    """An idle worker is removed after this long."""
    upscaling_speed: float = Field(1.0, gt=0)
    """Launcher: nodes added per step as a multiple of the running ones."""
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] = "Default"
    """KubeRay autoscaler upscaling mode."""
    data_dir: str = "/home/ray/fleet-data"
    """data_dir on the cluster's nodes (base model, caches); fleet.yaml in the clusters uses it."""
    train_storage_path: str | None = None
    """train.storage_path in the clusters: a location every node reaches (s3://bucket/fleet/runs). Empty: the head's disk (single-node runs only)."""
    serve_gpus: float = Field(1.0, ge=0)
    """GPUs (a MIG instance counts as one) per model replica in the clusters; 0 serves on CPUs."""
    serve_slice: str | None = None
    """MIG profile every model replica requests as fleet_slice_<profile> (e.g. 3g.40gb). Empty: any GPU."""
    ingress_replicas: int = Field(2, ge=1)
    """Replicas of the HTTP ingress deployment (FleetIngress)."""
    cron_schedule: str = "*/10 * * * *"
    """Kubernetes: cron schedule of the control-loop cycle (fleet run --once)."""
    cron_time_zone: str = "Etc/UTC"
    """Kubernetes: time zone of cron_schedule."""
    cycle_deadline_s: int = Field(540, ge=60)
    """Kubernetes: a cycle running longer is stopped; keep it below the cron interval so cycles never overlap."""
    registry_secret: str = "fleet-registry"
    """Kubernetes Secret holding the PostgreSQL URL under key url (referenced, never rendered)."""
    s3_secret: str = "fleet-s3"
    """Kubernetes Secret holding store-uri (s3://bucket/prefix) and optional access-key-id / secret-access-key."""
    ray_auth_secret: str = "fleet-ray-token"
    """Kubernetes Secret holding Ray's auth token under key auth_token: token authentication on both clusters' dashboards, Jobs API and GCS (referenced, never rendered)."""
    operator_namespace: str = "fleet-operators"
    """Kubernetes namespace whose pods may reach the clusters' dashboard, Jobs API, Ray client and metrics ports (operators' tools, Prometheus)."""
    kuberay_namespace: str = "kuberay-system"
    """Kubernetes namespace of the KubeRay operator, which reaches the heads' dashboards to deploy the Serve app and submit cycles."""
    api_namespaces: list[str] = Field(default_factory=list)
    """Kubernetes namespaces whose pods may call the OpenAI-compatible API (an ingress controller's). Empty: any source (every request needs an API key)."""
    overlays: dict[str, dict[str, Any]] = Field(default_factory=_default_overlays)
    """Kustomize overlays: name -> partial fleet config merged over this one (null removes a key)."""

    @field_validator("name", "namespace", "operator_namespace", "kuberay_namespace")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _DNS_LABEL.match(value):
            raise ValueError(
                f"{value!r} is not a DNS label (lowercase letters, digits, '-', at most 40 chars)"
            )
        return value

    @field_validator("api_namespaces")
    @classmethod
    def _namespaces(cls, value: list[str]) -> list[str]:
        for ns in value:
            cls._dns_label(ns)
        return value

    @field_validator("node_types", "overlays")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not _DNS_LABEL.match(key) or key == "head":
                raise ValueError(f"name {key!r} must be a DNS label other than 'head'")
        return value

    @field_validator("cron_schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError(f"{value!r} is not a 5-field cron schedule (minute hour day month weekday)")
        return value


class FleetConfig(_Section):
    """The whole configuration of one fleet."""

    data_dir: str = DEFAULT_DATA_DIR
    """Local state: SQLite registry, adapter store, base model, run checkpoints."""
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """The registry database."""
    store: StoreConfig = Field(default_factory=StoreConfig)
    """The adapter store."""
    base: BaseModelConfig = Field(default_factory=BaseModelConfig)
    """The shared base model."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """Adapter shape and engine size."""
    tiers: dict[str, TierConfig] = Field(default_factory=_default_tiers)
    """Per-tier settings, keyed company, team, individual."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Ingestion and chunking."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Packed training runs."""
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    """Scheduling policy and inventory."""
    serve: ServeConfig = Field(default_factory=ServeConfig)
    """The Serve application."""
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    """Drift measurement and policy."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """The Ray cluster."""
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    """Tune sweeps over learning schedules."""
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    """Deployment: Ray cluster launcher (cluster.yaml) and Kubernetes (k8s/), rendered by fleet.deploy."""

    @field_validator("tiers")
    @classmethod
    def _known_tiers(cls, tiers: dict[str, TierConfig]) -> dict[str, TierConfig]:
        unknown = sorted(set(tiers) - {"company", "team", "individual"})
        if unknown:
            raise ValueError(f"unknown tier(s) {unknown}; tiers are company, team, individual")
        merged = _default_tiers()
        merged.update(tiers)
        return merged

    @model_validator(mode="after")
    def _check(self) -> FleetConfig:
        if self.serve.max_replicas < self.serve.replicas:
            raise ValueError("serve.max_replicas must be >= serve.replicas")
        return self

    # -- resolved locations ---------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def registry_url(self) -> str:
        return self.registry.url or f"sqlite:///{self.data_path / 'fleet.db'}"

    @property
    def store_uri(self) -> str:
        return self.store.uri or (self.data_path / "adapters").as_uri()

    @property
    def base_path(self) -> Path:
        return Path(self.base.path) if self.base.path else self.data_path / "base"

    @property
    def runs_path(self) -> str:
        return self.train.storage_path or str(self.data_path / "runs")

    def without_secrets(self) -> FleetConfig:
        """A copy without passwords, for what other processes receive in the open (Serve deployment
        arguments, which the dashboard shows). Those processes take the secrets from their own
        environment: ``$FLEET_DB_URL`` (or libpq's ``PGPASSWORD``) and the ``AWS_*`` variables."""
        out = self.model_copy(deep=True)
        if out.registry.url:
            out.registry.url = strip_password(out.registry.url)
        if out.store.endpoint_url:
            out.store.endpoint_url = strip_password(out.store.endpoint_url)
        return out

    def tier(self, name: str) -> TierConfig:
        try:
            return self.tiers[str(getattr(name, "value", name))]
        except KeyError:
            raise ConfigError(f"unknown tier {name!r}; tiers are company, team, individual") from None


def _apply_env(raw: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    if env.get(ENV_DATA_DIR):
        raw["data_dir"] = env[ENV_DATA_DIR]
    if env.get(ENV_DB_URL):
        raw.setdefault("registry", {})["url"] = env[ENV_DB_URL]
    if env.get(ENV_STORE_URI):
        raw.setdefault("store", {})["uri"] = env[ENV_STORE_URI]
    return raw


def find_config_path(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Path | None:
    env = dict(os.environ) if env is None else env
    if path:
        return Path(path)
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG])
    local = Path.cwd() / DEFAULT_CONFIG_NAME
    return local if local.exists() else None


def load_config(
    path: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> FleetConfig:
    """Load the configuration (see the module docstring for the lookup order)."""
    env = dict(os.environ) if env is None else env
    cfg_path = find_config_path(path, env)
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if cfg_path is not None:
        if not cfg_path.exists():
            raise ConfigError(f"config file {cfg_path} does not exist (from --config or ${ENV_CONFIG})")
        try:
            loaded = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {cfg_path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {cfg_path} must hold a mapping at the top level")
        raw = loaded
        base_dir = cfg_path.resolve().parent
    raw = _apply_env(raw, env)
    if overrides:
        raw = _deep_merge(raw, overrides)
    return _validate(raw, f"config file {cfg_path}" if cfg_path else "configuration", base_dir)


def config_from_dict(raw: dict[str, Any], env: dict[str, str] | None = None) -> FleetConfig:
    """An already loaded config (as ``model_dump(mode="json")`` wrote it) with this process's
    environment overrides on top: how a process that received a config without its secrets gets them."""
    env = dict(os.environ) if env is None else env
    return _validate(_apply_env(copy.deepcopy(raw), env), "configuration", Path.cwd())


def _validate(raw: dict[str, Any], where: str, base_dir: Path) -> FleetConfig:
    try:
        cfg = FleetConfig.model_validate(raw)
    except PydanticValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(redact(f"{where} is invalid: {problems}")) from None
    return _absolutize(cfg, base_dir)


def _absolutize(cfg: FleetConfig, base_dir: Path) -> FleetConfig:
    data = Path(cfg.data_dir).expanduser()
    if not data.is_absolute():
        data = (base_dir / data).resolve()
    cfg.data_dir = str(data)
    if cfg.base.path and not Path(cfg.base.path).is_absolute():
        cfg.base.path = str((base_dir / cfg.base.path).resolve())
    if cfg.base.path and "name" not in cfg.base.model_fields_set:
        cfg.base.name = recorded_base_name(Path(cfg.base.path)) or cfg.base.name
    sp = cfg.train.storage_path
    if sp and "://" not in sp and not Path(sp).is_absolute():
        cfg.train.storage_path = str((base_dir / sp).resolve())
    return cfg


def recorded_base_name(path: Path) -> str | None:
    """The name a base directory's fleet record (fleet_base.json) gives it, if it has one."""
    try:
        name = json.loads((path / "fleet_base.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name) if isinstance(name, str) and name else None


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render_commented_yaml(cfg: FleetConfig | None = None) -> str:
    """The configuration as YAML with every field's docstring as a comment above it."""
    cfg = cfg or FleetConfig()
    lines = [
        "# fleet configuration. Every field is optional; shown here with its default.",
        f"# Overrides: ${ENV_DATA_DIR}, ${ENV_DB_URL} (registry.url), ${ENV_STORE_URI} (store.uri).",
        "",
    ]
    _render(cfg, lines, 0)
    return "\n".join(lines) + "\n"


def _render(model: BaseModel, lines: list[str], indent: int) -> None:
    pad = "  " * indent
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.description:
            for dl in field.description.strip().splitlines():
                lines.append(f"{pad}# {dl.strip()}")
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _render(value, lines, indent + 1)
        elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
            lines.append(f"{pad}{name}:")
            for key, sub in value.items():
                lines.append(f"{pad}  {key}:")
                _render(sub, lines, indent + 2)
        else:
            dumped = yaml.safe_dump(_plain(value), default_flow_style=True, width=1000).strip()
            dumped = dumped.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{name}: {dumped}")
        if indent == 0:
            lines.append("")


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
