"""Loading a base model: any Hugging Face causal-LM directory, never from a hub."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fleet.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-load bars would flood workers' logs
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"could not load the base model at {p}: {exc}") from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
