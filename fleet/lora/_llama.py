"""A Llama-family forward with fleet's own per-row KV cache, for generation and continuous batching.

Llama, Mistral and Qwen2 (``fleet.base.loading.SUPPORTED_MODEL_TYPES``) share this decoder layer
as Hugging Face writes it: RMSNorm, q/k/v/o projections (Qwen2's q/k/v carry biases, which the
wrapped projections apply), grouped-query attention, rotary embeddings from the model's own
rotary module (so any RoPE scaling the config names applies), a gated MLP. Sliding-window
attention is never needed: ``context_window`` caps every sequence at the window.

Why not Hugging Face's ``Cache``: continuous batching needs rows to join a running batch with
prompts of any length and to leave it without touching the others. HF's caches hold one
``[B, H, T, D]`` tensor per layer whose rows share one time axis (left padding) and can be
reordered but not joined by a row of another length. Here each row keeps its own tokens at
positions ``0..len-1`` of a preallocated ``[layers, rows, kv_heads, T, head_dim]`` buffer, with
its own length; a joining row is prefilled and copied into the next free row, a leaving row is
replaced by the last one (swap-remove), and the attention mask is just ``key < length``.

The layer math reuses the model's own submodules (norms, the engine-wrapped projections, the
MLP, the rotary embedding and ``apply_rotary_pos_emb``); only the attention over the cache is
ours, through ``scaled_dot_product_attention``. Tests check it against the model's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fleet.base.loading import check_architecture


def check_supported(model: nn.Module) -> None:
    """Refuse a model whose decoder layer is not the Llama family's (names it and the supported)."""
    check_architecture(getattr(model, "config", None), where="this base")


class KVCache:
    """Keys/values of the active rows: row b's tokens live at ``[:, b, :, :lengths[b]]``."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype, device: torch.device) -> None:
        config = model.config
        self.n_layers = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype, self.device = dtype, device
        self.n = 0  # active rows are 0..n-1
        self.K = torch.zeros(0, dtype=dtype, device=device)
        self.V = torch.zeros(0, dtype=dtype, device=device)
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)
        self.host_lengths: list[int] = []  # the same, on the host: decisions without a device sync
        self._reserve(8, 64)

    @property
    def rows_cap(self) -> int:
        return self.K.shape[1]

    @property
    def tokens_cap(self) -> int:
        return self.K.shape[3]

    def ensure(self, rows: int, tokens: int) -> None:
        """Room for ``rows`` rows of ``tokens`` tokens each (grows geometrically, copies live rows)."""
        if rows > self.rows_cap or tokens > self.tokens_cap:
            self._reserve(
                max(rows, 2 * self.rows_cap if rows > self.rows_cap else self.rows_cap),
                max(tokens, 2 * self.tokens_cap if tokens > self.tokens_cap else self.tokens_cap),
            )

    def _reserve(self, rows: int, tokens: int) -> None:
        shape = (self.n_layers, rows, self.kv_heads, tokens, self.head_dim)
        K = torch.zeros(shape, dtype=self.dtype, device=self.device)
        V = torch.zeros(shape, dtype=self.dtype, device=self.device)
        lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        if self.n:
            t = self.tokens_cap
            K[:, : self.n, :, :t] = self.K[:, : self.n]
            V[:, : self.n, :, :t] = self.V[:, : self.n]
            lengths[: self.n] = self.lengths[: self.n]
        self.K, self.V, self.lengths = K, V, lengths

    def remove(self, row: int) -> None:
        """Drop a row by moving the last active row into its place."""
        last = self.n - 1
        if row != last:
            self.K[:, row] = self.K[:, last]
            self.V[:, row] = self.V[:, last]
            self.lengths[row] = self.lengths[last]
            self.host_lengths[row] = self.host_lengths[last]
        self.host_lengths.pop()
        self.n -= 1


def _parts(model: nn.Module):
    inner = model.model
    return inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb, model.lm_head


def _layer(layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
    """One Llama decoder layer; ``attend(q, k, v)`` supplies the attention over whatever keys apply."""
    n, t, _ = h.shape
    attn = layer.self_attn
    residual = h
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(n, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(n, t, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(n, t, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    o = attend(q, k, v, attn.scaling)
    h = residual + attn.o_proj(o.transpose(1, 2).reshape(n, t, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def prefill(
    model: nn.Module,
    ids_BT: torch.Tensor,
    lengths_B: torch.Tensor,
    cache: KVCache | None,
    *,
    all_logits: bool = False,
    hidden: bool = False,
) -> torch.Tensor:
    """Run right-padded prompts; write their keys/values to cache rows ``n..n+B-1`` (if a cache).

    Returns the logits of each row's last prompt token ``[B, V]`` (or of every position
    ``[B, T, V]`` with ``all_logits``; positions past a row's length are junk). With ``hidden``,
    the final normed hidden states ``[B, T, D]`` instead, so that a caller needing log-probs at a
    few positions applies the LM head to those only (a ``[T, V]`` float tensor per prompt is what
    a long scoring request would otherwise cost).
    """
    embed, layers, norm, rotary, lm_head = _parts(model)
    n_rows, t = ids_BT.shape
    device = ids_BT.device
    h = embed(ids_BT)
    pos_BT = torch.arange(t, device=device).expand(n_rows, t)
    cos, sin = rotary(h, pos_BT)
    # Padding sits after each prompt, so the causal mask alone keeps every real token from seeing
    # padding (keys j ≤ i < len); padded positions compute junk that nothing reads.
    base = cache.n if cache is not None else 0
    for i, layer in enumerate(layers):

        def attend(q, k, v, scale, i=i):
            if cache is not None:
                cache.K[i, base : base + n_rows, :, :t] = k
                cache.V[i, base : base + n_rows, :, :t] = v
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
            )

        h = _layer(layer, h, cos, sin, attend)
    if cache is not None:
        cache.lengths[base : base + n_rows] = lengths_B
        cache.host_lengths.extend(lengths_B.tolist())
        cache.n += n_rows
    if hidden:
        return norm(h)
    if not all_logits:
        h = h[torch.arange(n_rows, device=device), lengths_B - 1][:, None]
    logits = lm_head(norm(h))
    return logits if all_logits else logits[:, 0]


def decode_step(model: nn.Module, tokens_B: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per active row at position ``lengths[b]``; return next-token logits ``[B, V]``."""
    embed, layers, norm, rotary, lm_head = _parts(model)
    n_rows = cache.n
    pos_B = cache.lengths[:n_rows]
    h = embed(tokens_B[:, None])
    cos, sin = rotary(h, pos_B[:, None])
    longest, shortest = max(cache.host_lengths), min(cache.host_lengths)
    t_used = longest + 1
    if longest == shortest:
        # Every row is at the same position: a plain slice write and no mask (faster kernels).
        where, mask = (slice(0, n_rows), slice(None), longest), None
    else:
        where = (torch.arange(n_rows, device=tokens_B.device), slice(None), pos_B)
        mask = (torch.arange(t_used, device=tokens_B.device) <= pos_B[:, None])[:, None, None, :]
    for i, layer in enumerate(layers):

        def attend(q, k, v, scale, i=i):
            K, V = cache.K[i], cache.V[i]
            K[where] = k[:, :, 0]
            V[where] = v[:, :, 0]
            return _sdpa(q, K[:n_rows, :, :t_used], V[:n_rows, :, :t_used], mask, scale)

        h = _layer(layer, h, cos, sin, attend)
    cache.lengths[:n_rows] += 1
    cache.host_lengths[:] = [n + 1 for n in cache.host_lengths]
    return lm_head(norm(h))[:, 0]
