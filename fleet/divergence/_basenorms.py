"""‖W₀‖_F of every adaptable base module, computed once per base and kept in the store.

Relative weight norms divide by these. They are keyed by the base's fingerprint (a sha256 over its
config and weights), so a changed base gets new norms and an unchanged one is never re-read: the
first process computes them (from the safetensors files, one tensor at a time, without building the
model) and writes ``drift.base-norms/<fingerprint>.json`` to the store; every later one, on any
node, reads that small object, and then keeps it in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from fleet.errors import ValidationError

_KEY = "drift.base-norms/{fingerprint}.json"
_MEMO: dict[str, dict[str, float]] = {}


def base_norms(fl) -> dict[str, float]:
    """Module path → ‖W₀‖_F for every linear module of the base named in ``lora.target_modules``."""
    from fleet.base import base_fingerprint, ensure_base

    path = ensure_base(fl.cfg, progress=False)
    fingerprint = base_fingerprint(path)
    memo_key = f"{fl.store.uri}|{fingerprint}|{','.join(sorted(fl.cfg.lora.target_modules))}"
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    key = _KEY.format(fingerprint=fingerprint)
    norms: dict[str, float] | None = None
    if fl.store.has_blob(key):
        norms = json.loads(fl.store.get_blob(key))
        if not _covers(norms, fl.cfg.lora.target_modules):
            norms = None  # made under other target modules: compute the full set again
    if norms is None:
        norms = compute_norms(path, fl.cfg.lora.target_modules)
        fl.store.put_blob(key, json.dumps(norms, sort_keys=True).encode())
    _MEMO[memo_key] = norms
    return norms


def _covers(norms: dict[str, float], targets: Iterable[str]) -> bool:
    have = {name.rsplit(".", 1)[-1] for name in norms}
    return set(targets) <= have


def compute_norms(path: str | Path, targets: Iterable[str]) -> dict[str, float]:
    """Norms straight from the weight files: safetensors lazily, tensor by tensor; other formats
    through ``torch.load(mmap=True)``."""
    wanted = set(targets)
    out: dict[str, float] = {}
    p = Path(path)
    files = sorted(p.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                    module = _module_of(name, wanted)
                    if module is not None:
                        w = st.get_tensor(name)
                        if w.dim() == 2:
                            out[module] = float(torch.linalg.vector_norm(w, dtype=torch.float64))
    else:
        for f in sorted([*p.glob("*.bin"), *p.glob("*.pt"), *p.glob("*.pth")]):
            state = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
            for name, w in state.items():
                module = _module_of(name, wanted)
                if module is not None and w.dim() == 2:
                    out[module] = float(torch.linalg.vector_norm(w, dtype=torch.float64))
    if not out:
        raise ValidationError(
            f"the base at {p} has no weight of a module named one of {sorted(wanted)} (lora.target_modules)"
        )
    return out


def _module_of(tensor_name: str, targets: set[str]) -> str | None:
    if not tensor_name.endswith(".weight"):
        return None
    module = tensor_name[: -len(".weight")]
    return module if module.rsplit(".", 1)[-1] in targets else None
