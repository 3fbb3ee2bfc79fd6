"""fleet.base — the shared base model: loading any local Hugging Face causal LM, and the
tiny offline default that fleet builds itself.

Public API::

    build_tiny_base(out_dir, *, seed=0, progress=True, steps=None) -> Path
    load_base(path, *, device="cpu", dtype=torch.float32) -> (model, tokenizer)
    ensure_base(cfg, *, progress=True) -> Path
    resolve_device(spec="auto") -> torch.device
    resolve_dtype(spec, device) -> torch.dtype
    base_fingerprint(path) -> str
    base_meta(path) -> dict            # the base's fleet_base.json ({} if none)
    is_causal_lm_dir(path) -> bool
    build_tokenizer() -> PreTrainedTokenizerFast   # the tiny base's byte-level tokenizer
    CHAT_TEMPLATE                      # "<|bos|><|user|>\\n{content}<|eos|>\\n<|assistant|>\\n..."

The tiny base: a 4-layer Llama (hidden 256, 4 heads of 128, MLP 512: 3.8M parameters) with a
byte-level tokenizer (ids 0–255 are bytes; then <|pad|> <|bos|> <|eos|> <|user|>
<|assistant|> <|system|> and two reserved ids: 264 in all), a prefix-matching copy
circuit set into its weights so that it can answer from facts in its prompt, and a
short deterministic pre-training on ``fleet.data.synth.general_text``.

Imports are lazy: ``import fleet.base`` does not load torch or transformers.
"""

from __future__ import annotations

from fleet._lazy import lazy_exports

_EXPORTS = {
    "build_tiny_base": "fleet.base.build",
    "ensure_base": "fleet.base.build",
    "base_fingerprint": "fleet.base.build",
    "base_meta": "fleet.base.build",
    "is_causal_lm_dir": "fleet.base.build",
    "META_FILE": "fleet.base.build",
    "TINY_BASE_NAME": "fleet.base.build",
    "load_base": "fleet.base.loading",
    "resolve_device": "fleet.base.loading",
    "resolve_dtype": "fleet.base.loading",
    "build_tokenizer": "fleet.base.tokenizer",
    "CHAT_TEMPLATE": "fleet.base.tokenizer",
    "import_base": "fleet.base.importing",
    "resolve_source": "fleet.base.importing",
    "chat_ids": "fleet.base.tokenizer",
    "load_tokenizer": "fleet.base.tokenizer",
    "stop_token_ids": "fleet.base.tokenizer",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
