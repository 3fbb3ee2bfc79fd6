"""Loading a base model: any Hugging Face causal-LM directory, never from a hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fleet.base.tokenizer import load_tokenizer, quiet_transformers
from fleet.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Architectures fleet trains, serves and scores (its decode path and KV cache are written for
# these; every one is checked row by row against PEFT). Hugging Face ``model_type`` names.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_architecture(config: Any, *, where: str = "the base") -> None:
    """Refuse an architecture fleet does not support, naming it and the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
        raise ConfigError(
            f"{where} is a {model_type!r} model ({archs}); fleet supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family causal LMs as Hugging Face defines them)"
        )


def context_window(config: Any) -> int | None:
    """Longest sequence the base attends over in full: its position limit, capped at its sliding
    window when it has one (Mistral; Qwen2 with use_sliding_window), so that full causal attention
    is exact for every sequence fleet runs. None when the config names no limit."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(config, "sliding_window", None)]
    if getattr(config, "model_type", None) == "qwen2" and not getattr(config, "use_sliding_window", False):
        limits[1] = None
    known = [int(x) for x in limits if isinstance(x, int) and x > 0]
    return min(known) if known else None


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: cuda when a GPU is visible to this process, else cpu; otherwise a torch device string."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"base.device {spec!r} is not a torch device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"base.device {spec!r} asks for CUDA but no GPU is visible; use auto or cpu")
    return device


def resolve_dtype(spec: str, device: str | torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (bfloat16 matmuls are slow or emulated there), bfloat16 on CUDA."""
    if spec == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return _DTYPES[spec]
    except KeyError:
        raise ConfigError(f"base.dtype {spec!r} is not one of auto, {', '.join(_DTYPES)}") from None


def load_base(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory, frozen, in eval mode.

    Only local files are read (no hub access, whatever the environment says). A
    tokenizer without a pad token gets its eos token as pad, as generation expects.
    """
    from fleet.base.build import is_causal_lm_dir

    p = Path(path).expanduser()
    if not is_causal_lm_dir(p):
        raise ConfigError(
            f"{p} is not a Hugging Face causal-LM directory (needs config.json naming a "
            "*ForCausalLM architecture, and weight files); build the default with `fleet base build`"
        )
    device = torch.device(device)
    tokenizer = load_tokenizer(p)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(p, local_files_only=True)
            check_architecture(config, where=f"the base at {p}")
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"could not load the base model at {p}: {exc}") from None
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
