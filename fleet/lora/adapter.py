"""One LoRA adapter in PEFT's format, framework-neutral: CPU tensors plus the four numbers that matter.

PEFT's directory format is exactly two files, ``adapter_config.json`` and
``adapter_model.safetensors``; the store keeps those bytes as they are, so an adapter
travels between fleet, PEFT and vLLM without conversion. Everything PEFT can express
that the engine does not compute (DoRA, trained biases, non-Linear targets, per-module
rank patterns, ...) is refused here with a message saying what to change, so that an
adapter never loads and then silently computes something else.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save
from torch import nn

from fleet.errors import UnsupportedAdapterError, ValidationError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT prefixes module paths of a PeftModel with "base_model.model." and drops the adapter name on save.
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)  # fmt: skip

_TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# Initialisations that leave weights usable on the untouched base. PiSSA, OLoRA, CorDA, LoftQ and
# LoRA-GA rewrite the base weights as well; such an adapter is only right on that rewritten base.
_PLAIN_INITS = (True, False, None, "gaussian", "eva", "orthogonal")
# Config fields that, when set to anything but their neutral value, change what the adapter computes.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora=true): fleet computes plain LoRA only; retrain without DoRA",
    "lora_bias": "a trained LoRA bias (lora_bias=true); retrain with lora_bias=false",
    "modules_to_save": "modules_to_save (fully trained copies of modules); retrain with LoRA targets only",
    "rank_pattern": "per-module ranks (rank_pattern); retrain with one rank for every module",
    "alpha_pattern": "per-module alphas (alpha_pattern); retrain with one lora_alpha",
    "layers_to_transform": "layers_to_transform (a subset of layers); target every layer",
    "layers_pattern": "layers_pattern; target every layer",
    "target_parameters": "target_parameters (LoRA on raw parameters, not nn.Linear modules)",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "use_qalora": "QALoRA (use_qalora=true)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D-style bases such as GPT-2); fleet adapts nn.Linear only",
}


def _refuse(what: str, hint: str = "") -> UnsupportedAdapterError:
    return UnsupportedAdapterError(f"unsupported adapter: {what}{'; ' + hint if hint else ''}")


@dataclass
class AdapterWeights:
    """A LoRA adapter: ``Δ W = scale · B A`` for every adapted module, in PEFT's tensor naming.

    ``tensors`` maps ``base_model.model.<module>.lora_A.weight`` to ``A`` ``[r, d_in]`` and
    ``...lora_B.weight`` to ``B`` ``[d_out, r]``.
    """

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    tensors: dict[str, torch.Tensor]
    base_model_name_or_path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValidationError(f"LoRA rank must be positive, got r={self.rank}")
        self.target_modules = sorted(set(self.target_modules))
        self._check_tensors()

    # ------------------------------------------------------------------ basics
    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA (PEFT's ``use_rslora``)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module path (as in ``model.named_modules()``) → ``(A [r, d_in], B [d_out, r])``."""
        out: dict[str, list] = {}
        for name, t in self.tensors.items():
            m = _TENSOR_NAME.match(name)
            assert m is not None  # checked in __post_init__
            out.setdefault(m["module"], [None, None])[0 if m["which"] == "A" else 1] = t
        return {k: (v[0], v[1]) for k, v in out.items()}

    def _check_tensors(self) -> None:
        foreign = [name for name in self.tensors if _TENSOR_NAME.match(name) is None]
        if foreign:  # name the most telling one: a DoRA vector says more than a saved base weight
            raise _tensor_refusal(min(foreign, key=_refusal_rank))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in self.tensors.items():
            m = _TENSOR_NAME.match(name)
            assert m is not None
            if t.dim() != 2:
                raise _refuse(
                    f"tensor {name} has shape {tuple(t.shape)}", "only nn.Linear targets (2-D A and B)"
                )
            suffix = m["module"].rsplit(".", 1)[-1]
            if suffix not in self.target_modules:
                raise _refuse(
                    f"extra tensor {name}: module {suffix!r} is not in target_modules {self.target_modules}"
                )
            pairs.setdefault(m["module"], {})[m["which"]] = t
        if not pairs:
            raise _refuse("the adapter has no LoRA tensors")
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                missing = ({"A", "B"} - set(ab)).pop()
                raise _refuse(f"missing tensor {PEFT_PREFIX}{module}.lora_{missing}.weight")
            a, b = ab["A"], ab["B"]
            if a.shape[0] != self.rank or b.shape[1] != self.rank:
                raise _refuse(
                    f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match r={self.rank}"
                )

    # ------------------------------------------------------------------ PEFT files
    def config_dict(self, base_model_name_or_path: str | None = None) -> dict:
        """The ``adapter_config.json`` PEFT writes for a plain LoRA (PEFT loads it as is)."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path or self.base_model_name_or_path,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_dora": False,
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
            "revision": None,
        }

    def to_bytes(self, base_model_name_or_path: str | None = None) -> tuple[bytes, bytes]:
        """``(adapter_config.json bytes, adapter_model.safetensors bytes)``."""
        config = json.dumps(self.config_dict(base_model_name_or_path), indent=2, sort_keys=True).encode()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(self.tensors.items())}
        return config, st_save(tensors)

    @classmethod
    def from_bytes(cls, config_json: bytes, safetensors: bytes) -> AdapterWeights:
        try:
            tensors = st_load(safetensors)
        except Exception as e:  # safetensors raises its own error types
            raise ValidationError(f"adapter_model.safetensors is not a valid safetensors file: {e}") from e
        return cls._from_parts(_parse_config(config_json), tensors)

    def to_peft_dir(self, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config_dict(base_model_name_or_path)
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}, path / WEIGHTS_NAME
        )
        return path

    @classmethod
    def from_peft_dir(cls, path: str | Path) -> AdapterWeights:
        path = Path(path)
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise ValidationError(
                f"{path} is not a PEFT LoRA directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(PEFT's save_pretrained with safe_serialization=True writes both)"
            )
        return cls._from_parts(_parse_config(config_path.read_bytes()), load_file(weights_path))

    @classmethod
    def _from_parts(cls, config: dict, tensors: dict[str, torch.Tensor]) -> AdapterWeights:
        targets = config.get("target_modules")
        if isinstance(targets, str) or targets is None:
            # A regex or "all-linear": the tensors say which modules were actually adapted.
            targets = sorted({_module_suffix(k) for k in tensors if _TENSOR_NAME.match(k)})
        return cls(
            rank=int(config["r"]),
            alpha=float(config.get("lora_alpha", 8)),
            use_rslora=bool(config.get("use_rslora", False)),
            target_modules=list(targets),
            tensors=tensors,
            base_model_name_or_path=config.get("base_model_name_or_path"),
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def fresh(
        cls,
        model: nn.Module,
        *,
        rank: int,
        alpha: float,
        target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
        use_rslora: bool = False,
        seed: int,
    ) -> AdapterWeights:
        """A new adapter as PEFT initialises one: A kaiming-uniform (a=√5, bound 1/√d_in), B = 0.

        Works on a plain model and on one wrapped by ``LoraEngine`` (same module paths).
        """
        g = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for name, d_in, d_out in linear_modules(model, target_modules):
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) on a [r, d_in] weight
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.empty(rank, d_in).uniform_(
                -bound, bound, generator=g
            )
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.zeros(d_out, rank)
        if not tensors:
            raise ValidationError(f"no nn.Linear module of the model is named one of {list(target_modules)}")
        return cls(rank, float(alpha), use_rslora, list(target_modules), tensors)

    @staticmethod
    def stack(levels: Sequence[AdapterWeights]) -> AdapterWeights:
        """One LoRA of rank ``Σ rᵢ`` equal to the sum of the levels (company + team + individual).

        ``Σᵢ sᵢ Bᵢ Aᵢ = [s₁B₁ | s₂B₂ | s₃B₃] · [A₁; A₂; A₃]``, so the stack is the concatenated A's and
        the scale-folded concatenated B's with scale 1 (alpha = r, no rslora). A module a level does not
        adapt contributes zero blocks.
        """
        if not levels:
            raise ValidationError("stack needs at least one adapter")
        per_level = [lv.modules() for lv in levels]
        shapes: dict[str, tuple[int, int, torch.dtype]] = {}
        for mods in per_level:
            for name, (a, b) in mods.items():
                shapes.setdefault(name, (a.shape[1], b.shape[0], a.dtype))
                if (a.shape[1], b.shape[0]) != shapes[name][:2]:
                    raise ValidationError(f"stack: levels disagree on the shape of {name}; same base model?")
        rank = sum(lv.rank for lv in levels)
        tensors: dict[str, torch.Tensor] = {}
        for name, (d_in, d_out, dtype) in sorted(shapes.items()):
            a_blocks, b_blocks = [], []
            for lv, mods in zip(levels, per_level, strict=True):
                if name in mods:
                    a, b = mods[name]
                    a_blocks.append(a.to(dtype))
                    b_blocks.append((b.double() * lv.scale).to(dtype))  # fold sᵢ; the new scale is 1
                else:
                    a_blocks.append(torch.zeros(lv.rank, d_in, dtype=dtype))
                    b_blocks.append(torch.zeros(d_out, lv.rank, dtype=dtype))
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.cat(a_blocks, 0)
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.cat(b_blocks, 1)
        targets = sorted({t for lv in levels for t in lv.target_modules})
        base = next((lv.base_model_name_or_path for lv in levels if lv.base_model_name_or_path), None)
        return AdapterWeights(rank, float(rank), False, targets, tensors, base)


def check_fits(
    weights: AdapterWeights,
    shapes: Mapping[str, tuple[int, int]],
    *,
    unknown: Callable[[str], Exception] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's ``(A, B)`` per module after checking that it fits a base whose adaptable
    modules are ``shapes`` (``path -> (d_in, d_out)``): every module it adapts exists there
    with its shape, and every module its ``target_modules`` names has tensors. ``unknown(path)``
    builds the error for a module the base lacks. The engine, the serving replica and
    ``fleet adapters import`` all refuse an adapter through this one check."""
    modules = weights.modules()
    for name in modules:
        if name not in shapes:
            raise (unknown or _not_in_base)(name)
    expected = {n for n in shapes if n.rsplit(".", 1)[-1] in weights.target_modules}
    missing = sorted(expected - set(modules))
    if missing:
        raise UnsupportedAdapterError(
            f"unsupported adapter: target_modules names {missing[0]} but it has no tensors for it "
            f"({len(missing)} module(s) missing); was it trained on a different base?"
        )
    for name, (A, B) in modules.items():
        d_in, d_out = shapes[name]
        if A.shape[1] != d_in or B.shape[0] != d_out:
            raise UnsupportedAdapterError(
                f"unsupported adapter: {name} has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} but the "
                f"base layer is {d_in}→{d_out}; the adapter belongs to a different base model"
            )
    return modules


def _not_in_base(name: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(
        f"unsupported adapter: it adapts {name}, which the base model does not have; "
        "the adapter belongs to a different base model"
    )


def linear_modules(model: nn.Module, target_modules: Iterable[str]) -> list[tuple[str, int, int]]:
    """``(module path, d_in, d_out)`` of every adaptable module whose last name is a target."""
    from fleet.lora._layer import SlotLinear  # the engine's wrapper keeps the base module's path

    targets = set(target_modules)
    out = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, SlotLinear):
            out.append((name, module.d_in, module.d_out))
        elif isinstance(module, nn.Linear):
            out.append((name, module.in_features, module.out_features))
        else:
            raise _refuse(
                f"target {name} is a {type(module).__name__}, not nn.Linear", "fleet adapts nn.Linear only"
            )
    return out


def _module_suffix(tensor_name: str) -> str:
    m = _TENSOR_NAME.match(tensor_name)
    return m["module"].rsplit(".", 1)[-1] if m else ""


_TELLING = ("lora_magnitude_vector", "lora_embedding", "modules_to_save", ".bias")


def _refusal_rank(name: str) -> int:
    return next((i for i, marker in enumerate(_TELLING) if marker in name), len(_TELLING))


def _tensor_refusal(name: str) -> UnsupportedAdapterError:
    if "lora_magnitude_vector" in name:
        return _refuse(f"DoRA tensor {name}", "fleet computes plain LoRA only; retrain without use_dora")
    if "lora_embedding" in name:
        return _refuse(f"{name} adapts an embedding", "fleet adapts nn.Linear modules only")
    if name.endswith(".bias"):
        return _refuse(f"trained bias {name}", "retrain with bias='none'")
    if "modules_to_save" in name:
        return _refuse(f"{name} is a fully trained module copy (modules_to_save)")
    return _refuse(
        f"tensor {name!r} is not a LoRA weight",
        "expected base_model.model.<module>.lora_A.weight / .lora_B.weight as PEFT saves them",
    )


def _parse_config(raw: bytes) -> dict:
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValidationError(f"adapter_config.json is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValidationError("adapter_config.json must hold a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise _refuse(
            f"peft_type {config.get('peft_type')!r}", "fleet loads LoRA adapters (peft_type LORA) only"
        )
    if "r" not in config:
        raise ValidationError("adapter_config.json has no rank 'r'")
    if config.get("bias", "none") != "none":
        raise _refuse(f"bias={config['bias']!r} (trained biases)", "retrain with bias='none'")
    for key, what in _UNSUPPORTED_FIELDS.items():
        value = config.get(key)
        # `is` for None/False: layers_to_transform=0 (layer 0 only) must not read as "unset".
        if not (value is None or value is False or (isinstance(value, (dict, list, str)) and not value)):
            raise _refuse(what)
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise _refuse(
            f"init_lora_weights={init!r} rewrites the base weights",
            "convert it to a plain LoRA first (PEFT: path_initial_model_for_weight_conversion)",
        )
    return config
