"""What a serving process builds from the config: the base, its tokenizer, the engine, prompts.

No Ray here: the model replica, the ingress and the tests (which compute the expected output
of every model alone) all build the same objects the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.config import FleetConfig
from fleet.errors import ConfigError, ValidationError

# Larger "model_max_length" values are transformers' placeholder for "unknown".
_NO_LIMIT = 1_000_000


def base_dir(cfg: FleetConfig) -> Path:
    """The base model's directory (built by `fleet base build` for the tiny default)."""
    path = cfg.base_path
    if not (path / "config.json").exists():
        raise ConfigError(
            f"no base model at {path}: build the tiny base with `fleet base build`, or set base.path "
            "to a Hugging Face causal-LM directory"
        )
    return path


def load_tokenizer(cfg: FleetConfig) -> Any:
    """The base's tokenizer (``fleet.base.tokenizer.load_tokenizer``: no torch, for the ingress)."""
    from fleet.base.tokenizer import load_tokenizer as load

    return load(base_dir(cfg))


def context_limit(cfg: FleetConfig, tokenizer: Any) -> int:
    """Longest prompt + completion the base serves: its position limit (and the tokenizer's, if set)."""
    raw = json.loads((base_dir(cfg) / "config.json").read_text())
    limits = [int(raw.get("max_position_embeddings") or _NO_LIMIT)]
    tok_max = int(getattr(tokenizer, "model_max_length", _NO_LIMIT) or _NO_LIMIT)
    if tok_max < _NO_LIMIT:
        limits.append(tok_max)
    return min(limits)


@dataclass
class ServingRuntime:
    """A base wrapped by a LoRA engine, with its tokenizer and context limit."""

    engine: Any
    tokenizer: Any
    context_limit: int

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id


def build_runtime(cfg: FleetConfig, *, slots: int | None = None) -> ServingRuntime:
    """The base (which must exist: a replica never builds one) in a LoRA engine with
    ``serve.adapter_slots`` slots (``fleet.lora.build``), its weights laid out for decoding
    (``fleet.lora.lay_out_for_cpu``), its tokenizer and context limit."""
    from fleet.lora import build_engine, lay_out_for_cpu

    engine, tokenizer = build_engine(cfg, slots=slots or cfg.serve.adapter_slots, path=base_dir(cfg))
    lay_out_for_cpu(engine.model)  # decode-friendly weight layouts on CPU; values unchanged
    return ServingRuntime(engine, tokenizer, context_limit(cfg, tokenizer))


# ---------------------------------------------------------------------- prompts
def encode_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """Token ids of a completion prompt: text through the tokenizer, or ids checked against the vocabulary."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt).input_ids)
    vocab = len(tokenizer)
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValidationError(
            f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt"
        )
    return list(prompt)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat: the base tokenizer's chat template with the assistant's cue appended."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(t) for t in ids]


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token as text for logprobs; a token that is part of a UTF-8 sequence is shown as its
    bytes, ``bytes:\\xe2\\x82`` (OpenAI's convention), so that distinct tokens never look alike."""
    text = tokenizer.decode([int(token_id)])
    if "\ufffd" not in text:
        return text
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    raw = _token_bytes(piece)
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw) if raw is not None else f"token_id:{token_id}"


def _token_bytes(piece: str) -> bytes | None:
    """The bytes behind a byte-level (GPT-2 style) or byte-fallback (``<0xE2>``) token piece."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    table = _byte_level_decoder()
    if all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return None


_BYTE_DECODER: dict[str, int] = {}


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character → byte (the inverse of ByteLevel's alphabet)."""
    if not _BYTE_DECODER:
        keep = [
            *range(ord("!"), ord("~") + 1),
            *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1),
        ]
        chars, n = list(keep), 0
        for b in range(256):
            if b not in keep:
                keep.append(b)
                chars.append(256 + n)
                n += 1
        _BYTE_DECODER.update({chr(c): b for b, c in zip(keep, chars, strict=True)})
    return _BYTE_DECODER


def config_from_args(args: dict[str, Any] | None) -> FleetConfig:
    """The config a Serve application was built with: ``{"config": path}`` (loaded here, with this
    process's environment overrides), ``{"config_json": {...}}`` (an already loaded config, shipped
    without its secrets: this process's environment overrides apply to it too), or nothing (the
    default lookup)."""
    from fleet.config import config_from_dict, load_config

    args = dict(args or {})
    if args.get("config_json") is not None:
        return config_from_dict(args["config_json"])
    return load_config(args.get("config"))
