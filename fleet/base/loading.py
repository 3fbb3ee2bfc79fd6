"""Loading a base model: any Hugging Face causal-LM directory, never from a hub."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

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


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-load progress bars or info logs (they would flood workers' logs)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


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


# Used when a base's tokenizer has no chat template of its own: one line per turn, then the
# assistant's cue. fleet's tiny base ships its own template (fleet.base.tokenizer.CHAT_TEMPLATE).
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The base's tokenizer as every part of fleet uses it: local files only, a pad token (its eos
    when it has none, as generation expects), a chat template (``SIMPLE_CHAT_TEMPLATE`` when the
    base has none). ``stop_token_ids(tokenizer)`` gives every token that ends a turn."""
    p = Path(path).expanduser()
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"could not load the base's tokenizer at {p}: {exc}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokenizer's eos and the base's generation-config eos ids (Llama 3 ends a turn with
    ``<|eot_id|>``, SmolLM2 and Qwen2 with ``<|im_end|>``): generation stops on any of them.
    The generation config is read from the directory the tokenizer was loaded from."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    source = str(getattr(tokenizer, "name_or_path", "") or "")
    gen_file = Path(source) / "generation_config.json"
    if source and gen_file.is_file():
        import json

        try:
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except ValueError:
            eos = None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(t) for t in eos if isinstance(t, int))
    return tuple(sorted(ids))
