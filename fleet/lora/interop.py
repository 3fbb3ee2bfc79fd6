"""PEFT import/export and single-prompt generation against the registry and the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet.errors import NotFoundError, UnsupportedAdapterError, ValidationError
from fleet.lora.adapter import AdapterWeights, check_fits, linear_modules
from fleet.registry import PublishRequest, VersionRecord
from fleet.types import validate_id


def _meta_model(cfg):
    """The base's module shapes without loading its weights (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fleet.base import ensure_base

    conf = AutoConfig.from_pretrained(str(ensure_base(cfg)))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf)


def check_fits_base(cfg, weights: AdapterWeights) -> None:
    """Refuse an adapter whose modules or shapes do not match the base (before anything is stored)."""
    shapes = {
        name: (d_in, d_out) for name, d_in, d_out in linear_modules(_meta_model(cfg), weights.target_modules)
    }
    check_fits(
        weights,
        shapes,
        unknown=lambda name: UnsupportedAdapterError(
            f"the adapter adapts {name}, which the base model {cfg.base.name!r} does not have"
        ),
    )


def import_peft(fl, model_id: str, peft_dir: str) -> tuple[VersionRecord, bool]:
    """Publish a PEFT directory as the model's active version: ``(version, new?)``.

    Idempotent by content: when the model already has a version with the same files (the digest
    the store registers), that version is made active again (if it is not) and nothing is stored.
    """
    from fleet.store import version_digest

    validate_id(model_id)
    model = fl.registry.get_model(model_id)
    if not Path(peft_dir).is_dir():
        raise ValidationError(
            f"{peft_dir}: not a directory (expected adapter_config.json + adapter_model.safetensors)"
        )
    weights = AdapterWeights.from_peft_dir(peft_dir)
    check_fits_base(fl.cfg, weights)
    config_b, weights_b = weights.to_bytes(fl.cfg.base.name)
    digest = version_digest(config_b, weights_b)
    for v in reversed(fl.registry.versions(model_id)):
        if v.sha256 == digest and not v.state.is_terminal:  # promoting the active one changes nothing
            return fl.registry.promote(model_id, v.version), False
    staged = fl.store.stage(model_id, config_b, weights_b)
    (v,) = fl.registry.publish_versions(
        fl.store,
        [
            PublishRequest(
                model_id=model_id,
                staged=staged,
                rank=weights.rank,
                alpha=weights.alpha,
                base_model=model.base_model,
                watermark=model.watermark,
                metrics={"imported_from": str(Path(peft_dir).resolve())},
            )
        ],
    )
    return v, True


def _read(fl, entry) -> AdapterWeights:
    files = fl.store.read_version(entry.uri, entry.sha256)
    return AdapterWeights.from_bytes(files.config, files.weights)


def export_peft(fl, model_id: str, out_dir: str, *, stack: bool = False) -> str:
    st = fl.registry.active_stack(model_id)
    if stack:
        if not st.entries:
            raise NotFoundError(
                f"{model_id!r} and its ancestors have no active version: it is served by the base alone"
            )
        weights = AdapterWeights.stack([_read(fl, e) for e in st.entries])
        what = "+".join(e.key for e in st.entries)
    else:
        own = next((e for e in st.entries if e.model_id == model_id), None)
        if own is None:
            raise NotFoundError(f"{model_id!r} has no active version (use --stack to export what serves it)")
        weights, what = _read(fl, own), own.key
    weights.to_peft_dir(out_dir, base_model_name_or_path=str(fl.cfg.base_path))
    return what


def generate_for(
    fl, model_id: str, prompt: str, *, max_tokens: int, temperature: float, top_k: int
) -> dict[str, Any]:
    """One completion by the same engine that serves, with prompt log-probabilities."""
    from fleet.lora import generate, prompt_logprobs
    from fleet.lora.build import StackSlots, build_engine

    if not prompt:
        raise ValidationError("--prompt must not be empty")
    st = fl.registry.active_stack(model_id)
    engine, tok = build_engine(fl.cfg, slots=len(st.entries), ranks=[e.rank for e in st.entries])
    row = StackSlots(engine, fl.store).row(st)
    ids = tok(prompt)["input_ids"]
    (g,) = generate(engine, tok, [ids], [row], max_new_tokens=max_tokens, temperature=temperature, seed=0)
    lp = prompt_logprobs(engine, [ids], [row], top_k=top_k)[0]
    return {
        "model": model_id,
        "served_by": st.served_by,
        "text": g.text,
        "token_ids": list(g.token_ids),
        "prompt_logprobs": lp,
    }
