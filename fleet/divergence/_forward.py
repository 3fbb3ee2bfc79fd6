"""One forward of the probe rows under S stacks, shaped so the engine reads each stack's adapters once.

Scoring runs the same P probe rows under every stack. Given to the model as ``S·P`` rows, the
engine gathers the stack's A and B once per *row* and multiplies T-token slices by them (small
matmuls, the same weights copied P times over). For Llama-architecture bases the probe rows of one
stack are instead laid end to end as ONE engine row of ``P·T`` tokens: every projection (base and
LoRA) then sees ``[S, P·T, d]``, the adapters are gathered once per stack and each LoRA product is
one long matmul. Attention alone is computed per probe row — queries, keys and values are folded
back to ``[S·P, heads, T, head_dim]`` with causal masking — and rotary positions restart at 0 in
every probe row, so the result is exactly that of the rows run one by one (tests compare it with
the model's own forward). Other architectures take the model's own forward over ``S·P`` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def packable(model) -> bool:
    inner = getattr(model, "model", None)
    return (
        getattr(getattr(model, "config", None), "model_type", None) == "llama"
        and inner is not None
        and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
    )


def stacked_logits(engine, slots_SL: list[list[int]], ids_PT: Tensor) -> Tensor:
    """Logits ``[S, P, T, V]`` of the P probe rows under each of the S slot rows (company, team, own)."""
    S, (P, T) = len(slots_SL), ids_PT.shape
    model = engine.model
    if not packable(model):
        rows = [s for s in slots_SL for _ in range(P)]
        with engine.rows(torch.tensor(rows, dtype=torch.long)):
            return model(input_ids=ids_PT.repeat(S, 1)).logits.view(S, P, T, -1)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    with engine.rows(torch.tensor(slots_SL, dtype=torch.long)):
        h = inner.embed_tokens(ids_PT).reshape(1, P * T, -1).expand(S, -1, -1).contiguous()
        pos = torch.arange(T, device=ids_PT.device).repeat(P).expand(S, -1)
        cos, sin = inner.rotary_emb(h, pos)
        for layer in inner.layers:
            attn = layer.self_attn
            hd = attn.head_dim
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(S, P * T, -1, hd).transpose(1, 2)
            k = attn.k_proj(x).view(S, P * T, -1, hd).transpose(1, 2)
            v = attn.v_proj(x).view(S, P * T, -1, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = F.scaled_dot_product_attention(
                _per_row(q, P, T), _per_row(k, P, T), _per_row(v, P, T),
                is_causal=True, scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1],
            )  # fmt: skip
            o = o.view(S, P, -1, T, hd).permute(0, 1, 3, 2, 4).reshape(S, P * T, -1)
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return model.lm_head(inner.norm(h)).view(S, P, T, -1)


def _per_row(x_SHLD: Tensor, P: int, T: int) -> Tensor:
    """``[S, H, P·T, hd]`` → ``[S·P, H, T, hd]``: each probe row attends only to itself."""
    S, H, _, hd = x_SHLD.shape
    return x_SHLD.view(S, H, P, T, hd).transpose(1, 2).reshape(S * P, H, T, hd)
