"""The GPUs fleet knows: one catalogue for the scheduler (memory, relative speed, MIG profiles,
Ray's ``accelerator_type`` label) and for deployment (the node label GPU feature discovery sets,
EC2 families, MIG slice sizes).

Each card has fleet's name (``h100-80gb``: what slice profiles and ``scheduler.inventory`` use)
and its deployment name (``H100``: what ``deploy.node_types.*.gpu`` uses); ``gpu(name)`` finds
a card by either, by Ray's label, or by a short alias, case-insensitively.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIG_COMPUTE_SLICES = 7
MIG_MEMORY_SLICES = 8


@dataclass(frozen=True)
class MigProfile:
    compute: int
    """Compute slices (of 7) the instance takes."""
    memory: int
    """Memory slices (of 8) the instance takes."""


@dataclass(frozen=True)
class GpuModel:
    name: str
    """fleet's name: slice profiles and the scheduler's inventory."""
    deploy_name: str
    """The name in ``deploy.node_types.*.gpu``."""
    memory_gb: float
    speed: float
    """Training throughput relative to a full H100."""
    ray_type: str
    """Ray's ``accelerator_type`` label for the card (``A100-80G`` must be set by the operator)."""
    product_label: str
    """Value of the node label nvidia.com/gpu.product (NVIDIA GPU feature discovery)."""
    mig: dict[str, MigProfile] = field(default_factory=dict)
    """MIG profiles by name; empty: the card has no MIG."""
    aws_families: tuple[str, ...] = ()
    """EC2 instance families that carry this GPU."""


_MIG_40GB = {
    "1g.5gb": MigProfile(1, 1),
    "1g.10gb": MigProfile(1, 2),
    "2g.10gb": MigProfile(2, 2),
    "3g.20gb": MigProfile(3, 4),
    "4g.20gb": MigProfile(4, 4),
    "7g.40gb": MigProfile(7, 8),
}
_MIG_80GB = {
    "1g.10gb": MigProfile(1, 1),
    "1g.20gb": MigProfile(1, 2),
    "2g.20gb": MigProfile(2, 2),
    "3g.40gb": MigProfile(3, 4),
    "4g.40gb": MigProfile(4, 4),
    "7g.80gb": MigProfile(7, 8),
}
_MIG_141GB = {
    "1g.18gb": MigProfile(1, 1),
    "1g.35gb": MigProfile(1, 2),
    "2g.35gb": MigProfile(2, 2),
    "3g.71gb": MigProfile(3, 4),
    "4g.71gb": MigProfile(4, 4),
    "7g.141gb": MigProfile(7, 8),
}

GPUS: dict[str, GpuModel] = {
    g.name: g
    for g in (
        GpuModel("a10g", "A10G", 24.0, 0.12, "A10G", "NVIDIA-A10G", {}, ("g5",)),
        GpuModel("l4", "L4", 24.0, 0.12, "L4", "NVIDIA-L4", {}, ("g6",)),
        GpuModel("l40s", "L40S", 48.0, 0.35, "L40S", "NVIDIA-L40S", {}, ("g6e",)),
        GpuModel("a100-40gb", "A100-40GB", 40.0, 0.40, "A100", "NVIDIA-A100-SXM4-40GB", _MIG_40GB, ("p4d",)),
        GpuModel(
            "a100-80gb", "A100-80GB", 80.0, 0.40, "A100-80G", "NVIDIA-A100-SXM4-80GB", _MIG_80GB, ("p4de",)
        ),
        GpuModel("h100-80gb", "H100", 80.0, 1.00, "H100", "NVIDIA-H100-80GB-HBM3", _MIG_80GB, ("p5",)),
        GpuModel("h200-141gb", "H200", 141.0, 1.10, "H200", "NVIDIA-H200", _MIG_141GB, ("p5e", "p5en")),
    )
}
GPU_ALIASES = {"h100": "h100-80gb", "h200": "h200-141gb", "a100": "a100-40gb"}
"""Short spellings of a card, lower-cased."""
RAY_TYPES: dict[str, str] = {g.ray_type: g.name for g in GPUS.values()} | {"A100-40G": "a100-40gb"}
"""Ray ``accelerator_type`` label → card. Plain ``A100`` (Ray's own label for both sizes) reads as 40 GB."""
DEPLOY_GPUS: dict[str, GpuModel] = {g.deploy_name: g for g in GPUS.values()}
"""The catalogue by deployment name (``deploy.node_types.*.gpu``)."""

_BY_ANY_NAME = (
    {k.lower(): g for k, g in GPUS.items()}
    | {k.lower(): GPUS[v] for k, v in GPU_ALIASES.items()}
    | {k.lower(): GPUS[v] for k, v in RAY_TYPES.items()}
    | {k.lower(): g for k, g in DEPLOY_GPUS.items()}
)


def gpu(name: str) -> GpuModel | None:
    """The card called ``name`` (fleet's name, deployment name, Ray label or alias), or None."""
    return _BY_ANY_NAME.get(str(name).strip().lower())
