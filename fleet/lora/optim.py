"""AdamW for the members of a packed training run, vectorised over their slots.

One torch optimizer per member would mean K optimizers × 2·(adapted modules) tiny tensors per
step; here every pool tensor is updated once for all members, with per-member tensors for
what must stay per member: learning rate (each member has its own schedule), step count (a
member may join a pack later or resume from its own checkpoint), and gradient-norm clipping
(the norm over that member's A and B in every layer). A global clip would let one tenant's
large gradients shrink everybody else's update; nothing here couples two members.

The update is exactly ``torch.optim.AdamW``'s (decoupled weight decay, bias-corrected moments),
so a member trained in a pack follows the same trajectory it would alone. Moments are kept in
float32; train with float32 pools (``LoraEngine(..., dtype=torch.float32)``, also over a bfloat16
base): the pools are the weights, and bfloat16 pools would round every update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fleet.errors import ValidationError
from fleet.lora.adapter import PEFT_PREFIX
from fleet.lora.engine import LoraEngine


class SlotAdamW:
    """AdamW over ``keys``' slots of ``engine`` (each must be loaded trainable)."""

    def __init__(
        self,
        engine: LoraEngine,
        keys: Sequence[str],
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not keys or len(set(keys)) != len(keys):
            raise ValidationError("SlotAdamW needs a non-empty list of distinct adapter keys")
        for key in keys:
            if not engine.is_trainable(key):
                raise ValidationError(f"adapter {key!r} is not trainable; load it with trainable=True")
        self.engine = engine
        self.keys = list(keys)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        device = engine.device
        self._pool_idx = torch.tensor([engine.slot(k) + 1 for k in self.keys], device=device)
        self._params = [p for layer in engine.layers.values() for p in (layer.At_SDR, layer.Bt_SRO)]
        n = len(self.keys)
        self._exp_avg = [
            torch.zeros(n, *p.shape[1:], dtype=torch.float32, device=device) for p in self._params
        ]
        self._exp_avg_sq = [torch.zeros_like(m) for m in self._exp_avg]
        self._step = torch.zeros(n, dtype=torch.float64)  # per member, CPU: bias corrections in double
        self._lr = torch.zeros(n, dtype=torch.float64)

    # ------------------------------------------------------------------ per-member knobs
    def set_lr(self, lr_by_key: dict[str, float]) -> None:
        """Set this step's learning rate of some or all members (each follows its own schedule)."""
        for key, lr in lr_by_key.items():
            self._lr[self._index(key)] = float(lr)

    def grad_norms(self) -> dict[str, float]:
        """L2 norm of each member's gradient over all its A and B tensors in every layer."""
        return dict(zip(self.keys, self._norms().tolist(), strict=True))

    def clip_(self, max_norm_by_key: dict[str, float]) -> dict[str, float]:
        """Scale each listed member's gradient to at most its max norm, like ``clip_grad_norm_``.

        Returns the pre-clip norms of all members.
        """
        norms = self._norms()
        coef = torch.ones(len(self.keys), dtype=torch.float64)
        for key, max_norm in max_norm_by_key.items():
            i = self._index(key)
            coef[i] = min(1.0, float(max_norm) / (float(norms[i]) + 1e-6))
        if bool((coef < 1).any()):
            for p in self._params:
                if p.grad is None:
                    continue
                c = coef.to(p.grad.device, p.grad.dtype).view(-1, *([1] * (p.dim() - 1)))
                p.grad.index_copy_(0, self._pool_idx, p.grad.index_select(0, self._pool_idx) * c)
        return dict(zip(self.keys, norms.tolist(), strict=True))

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, keys: Sequence[str] | None = None) -> None:
        """One AdamW step for every member (or only ``keys``: the others are left as they are)."""
        sel = torch.arange(len(self.keys)) if keys is None else torch.tensor([self._index(k) for k in keys])
        if sel.numel() == 0:
            return
        beta1, beta2 = self.betas
        self._step[sel] += 1
        step, lr = self._step[sel], self._lr[sel]
        bc1 = 1 - beta1**step
        bc2_sqrt = (1 - beta2**step).sqrt()
        device = self.engine.device
        sel_dev = sel.to(device)
        pool_idx = self._pool_idx[sel_dev]
        for p, m_all, v_all in zip(self._params, self._exp_avg, self._exp_avg_sq, strict=True):
            shape = (-1, *([1] * (p.dim() - 1)))
            w = p.data.index_select(0, pool_idx).float()
            g = p.grad.index_select(0, pool_idx).float() if p.grad is not None else torch.zeros_like(w)
            m, v = m_all.index_select(0, sel_dev), v_all.index_select(0, sel_dev)
            w.mul_((1 - lr * self.weight_decay).to(device, torch.float32).view(shape))
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bc2_sqrt.to(device, torch.float32).view(shape)).add_(self.eps)
            w.add_((m / denom) * (-lr / bc1).to(device, torch.float32).view(shape))
            m_all.index_copy_(0, sel_dev, m)
            v_all.index_copy_(0, sel_dev, v)
            p.data.index_copy_(0, pool_idx, w.to(p.dtype))

    def zero_grad(self) -> None:
        for p in self._params:
            p.grad = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Per-member state in PEFT tensor names and the member's own rank, on CPU.

        Keyed by member, so a member's state can be saved, resumed or moved to another pack alone.
        """
        members = {}
        for i, key in enumerate(self.keys):
            members[key] = {
                "step": int(self._step[i]),
                "lr": float(self._lr[i]),
                "exp_avg": self._member_tensors(self._exp_avg, i, key),
                "exp_avg_sq": self._member_tensors(self._exp_avg_sq, i, key),
            }
        return {
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "members": members,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore the members present in ``sd`` (others keep their state)."""
        self.betas = tuple(sd.get("betas", self.betas))
        self.eps = float(sd.get("eps", self.eps))
        self.weight_decay = float(sd.get("weight_decay", self.weight_decay))
        for key, state in sd["members"].items():
            if key not in self.keys:
                continue
            i = self._index(key)
            self._step[i] = float(state["step"])
            self._lr[i] = float(state["lr"])
            self._load_member_tensors(self._exp_avg, i, key, state["exp_avg"])
            self._load_member_tensors(self._exp_avg_sq, i, key, state["exp_avg_sq"])

    # ------------------------------------------------------------------ internals
    def _index(self, key: str) -> int:
        try:
            return self.keys.index(key)
        except ValueError:
            raise ValidationError(f"adapter {key!r} is not a member of this optimizer") from None

    def _norms(self) -> torch.Tensor:
        sq = torch.zeros(len(self.keys), dtype=torch.float64, device=self.engine.device)
        for p in self._params:
            if p.grad is not None:
                g = p.grad.index_select(0, self._pool_idx).double()
                sq += g.pow(2).flatten(1).sum(1)
        return sq.sqrt().cpu()

    def _names(self, key: str):
        """(state list position, PEFT tensor name, is_A) for each module the member adapts."""
        modules = set(self.engine.adapted_modules(key))
        for j, name in enumerate(self.engine.layers):
            if name in modules:
                yield 2 * j, f"{PEFT_PREFIX}{name}.lora_A.weight", True
                yield 2 * j + 1, f"{PEFT_PREFIX}{name}.lora_B.weight", False

    def _member_tensors(self, states: list[torch.Tensor], i: int, key: str) -> dict[str, torch.Tensor]:
        rank = self.engine.rank(key)
        out = {}
        for pos, name, is_a in self._names(key):
            t = states[pos][i]  # At [d_in, R] or Bt [R, d_out]
            out[name] = (t[:, :rank] if is_a else t[:rank]).t().contiguous().cpu()
        return out

    def _load_member_tensors(self, states: list[torch.Tensor], i: int, key: str, tensors: dict) -> None:
        rank = self.engine.rank(key)
        for pos, name, is_a in self._names(key):
            if name not in tensors:
                raise ValidationError(f"optimizer state of {key!r} lacks {name}")
            t = tensors[name].t().to(states[pos].device, states[pos].dtype)
            states[pos][i].zero_()
            if is_a:
                states[pos][i, :, :rank] = t
            else:
                states[pos][i, :rank] = t
