"""Building the embedded default base, and finding the configured one.

``build_tiny_base`` creates the tiny offline base (tokenizer, copy circuit, short
pre-training) and writes it atomically; ``ensure_base`` is what commands call to get
a usable base directory; ``base_fingerprint`` identifies a base's exact weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from fleet.base.pretrain import (
    BUILD_THREADS,
    PretrainSpec,
    build_threads,
    heldout_nll,
    init_model,
    pretrain,
    training_rows,
)
from fleet.base.tokenizer import build_tokenizer
from fleet.data.synth import general_text
from fleet.errors import ConfigError

META_FILE = "fleet_base.json"
TINY_BASE_NAME = "fleet-tiny-llama"
HELDOUT_SEED = 10_001  # general text never used for pre-training (pre-training uses seed*1000+k)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def build_tiny_base(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    progress: bool = True,
    steps: int | None = None,
    force: bool = False,
) -> Path:
    """Create the tiny offline base in ``out_dir`` and return its path.

    Deterministic: the same seed (and steps) gives identical weights on the same
    machine. ``steps`` shortens pre-training (tests); the default is the real build.
    The directory appears complete or not at all (built in a temporary sibling, then
    renamed). ``out_dir`` must be missing or empty, or hold a fleet base and ``force``
    be given (see ``check_replaceable``): nothing else is ever replaced.
    """
    out = Path(out_dir).expanduser().resolve()
    check_replaceable(out, force=force)
    spec = PretrainSpec() if steps is None else PretrainSpec(steps=steps)
    tmp = new_sibling(out, "building")
    started = time.perf_counter()
    try:
        tokenizer = build_tokenizer()
        with build_threads():
            model = init_model(tokenizer, seed)
            rows = training_rows(tokenizer, spec.steps * spec.batch, spec.seq_len, seed)
            losses = _pretrain_with_progress(model, rows, spec, progress)
            heldout = heldout_nll(model, tokenizer, general_text(64, seed=HELDOUT_SEED))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        save_quietly(model, tokenizer, tmp)
        meta: dict[str, Any] = {
            "name": TINY_BASE_NAME,
            "seed": seed,
            "params": sum(p.numel() for p in model.parameters()),
            "steps": spec.steps,
            "batch": spec.batch,
            "seq_len": spec.seq_len,
            "lr": spec.lr,
            "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
            "heldout_nll": round(heldout, 4),
            "build_seconds": round(time.perf_counter() - started, 1),
            "torch_threads": BUILD_THREADS,
            "tokenizer": "byte-level (256 bytes + 8 special tokens)",
        }
        meta.update(fingerprint_record(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        publish_base(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pretrain_with_progress(model, rows, spec: PretrainSpec, progress: bool) -> list[float]:
    if not progress:
        return pretrain(model, rows, spec)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]pre-training tiny base"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("pretrain", total=spec.steps, loss=float("nan"))
        return pretrain(model, rows, spec, lambda step, loss: bar.update(task, advance=1, loss=loss))


def save_quietly(model, tokenizer, path: Path) -> None:
    from fleet.base.tokenizer import quiet_transformers

    with quiet_transformers():
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)


def check_replaceable(out: Path, *, force: bool) -> None:
    """Refuse to write a base over anything but a missing or empty directory, or (with ``force``)
    a base fleet wrote itself: a real checkpoint or an unrelated directory is never replaced."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        return
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    if not any(out.iterdir()):
        return
    if not (out / META_FILE).is_file():
        raise ConfigError(
            f"{out} is not empty and is not a base fleet wrote (no {META_FILE}); "
            "it is left as it is: choose another --out, or remove it yourself"
        )
    if not force:
        raise ConfigError(f"{out} already holds a fleet base; pass --force to replace it")


def new_sibling(out: Path, what: str) -> Path:
    """A fresh temporary path beside ``out`` (same filesystem, so the final rename is atomic)."""
    return out.parent / f".{out.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish_base(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        # Another process published first (same seed: the same base); keep theirs.
        if not is_causal_lm_dir(out):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Finding and identifying a base
# ---------------------------------------------------------------------------------------
def is_causal_lm_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a Hugging Face causal-LM directory (config + weights)."""
    p = Path(path)
    cfg = p / "config.json"
    if not (p.is_dir() and cfg.is_file()):
        return False
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") or []
    causal = (
        any(str(a).endswith("ForCausalLM") for a in archs)
        or config.get("model_type") in _causal_model_types()
    )
    return causal and bool(_weight_files(p))


def _causal_model_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def ensure_base(cfg, *, progress: bool = True) -> Path:
    """The base directory of ``cfg`` (a ``fleet.config.FleetConfig``), ready to load.

    The default location (``base.path`` empty: ``<data_dir>/base``) is built on first
    use. A configured path is never built or changed: if it is missing or not a
    causal-LM directory, a ConfigError names it.
    """
    path = cfg.base_path
    if cfg.base.path is None:
        if not path.exists():
            return build_tiny_base(path, progress=progress)
        if not is_causal_lm_dir(path):
            raise ConfigError(
                f"{path} exists but is not a base model directory (no config.json and weights); "
                "remove it and run `fleet base build`"
            )
        return path
    if not path.exists():
        raise ConfigError(
            f"base.path {path} does not exist; set base.path to a Hugging Face causal-LM directory"
        )
    if not is_causal_lm_dir(path):
        raise ConfigError(
            f"base.path {path} is not a Hugging Face causal-LM directory "
            "(needs config.json naming a *ForCausalLM architecture, and weight files)"
        )
    return path


def _weight_files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))


def _stat_key(files: list[Path]) -> dict[str, list[int]]:
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def _compute_fingerprint(path: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    config.pop("transformers_version", None)  # the writer's version is not part of the model
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def fingerprint_record(path: Path) -> dict[str, Any]:
    files = [path / "config.json", *_weight_files(path)]
    return {
        "fingerprint": _compute_fingerprint(path, files[1:]),
        "fingerprint_files": _stat_key(files),
    }


def base_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 over a base's config (minus the writer's version) and weight files.

    Cached in ``fleet_base.json`` beside the weights, valid while the files' sizes and
    mtimes are unchanged; a read-only directory is simply hashed every time.
    """
    p = Path(path)
    if not is_causal_lm_dir(p):
        raise ConfigError(f"{p} is not a Hugging Face causal-LM directory; cannot fingerprint it")
    meta_path = p / META_FILE
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
    files = [p / "config.json", *_weight_files(p)]
    if meta.get("fingerprint") and meta.get("fingerprint_files") == _stat_key(files):
        return str(meta["fingerprint"])
    meta.update(fingerprint_record(p))
    try:
        tmp = meta_path.with_name(f".{META_FILE}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, meta_path)
    except OSError:
        pass  # read-only model directory: no cache
    return str(meta["fingerprint"])


def base_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The base's ``fleet_base.json`` (empty for a base fleet did not build)."""
    meta_path = Path(path) / META_FILE
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return {}
