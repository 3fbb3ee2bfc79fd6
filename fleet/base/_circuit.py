"""A prefix-matching copy circuit, set into the tiny base's weights before pre-training.

Why: the base must answer a fact question when the fact is in its prompt (in-context
recall). That takes an induction-style circuit: find the earlier place whose preceding
text matches the text before the cursor, and copy what followed it. Gradient descent
finds such circuits only after a long plateau: a plain 4-layer model of this size
trained on the same text showed no copying at all after 800 steps, ten times what
pre-training's ≤60 s on two cores buys. So the circuit is written in directly, held
fixed, and pre-training learns the language around it (and when to trust it).

Residual stream layout (hidden size 256)::

    CONST   1   a constant 4: source of the positional heads' queries and keys
    BOSF    1   1 on <|bos|>: the copy head's "nothing matched" sink
    E      48   token identity, orthonormal for the 48 most frequent bytes (fixed)
    QW     64   16 blocks × 4: hash codes of the tokens at offsets 0..15
    KW     64   16 blocks × 4: hash codes of the tokens at offsets 1..16
    OUT    48   the copied identity, read by lm_head's (fixed) OUT columns
    BOSN    1   <|bos|> only: gives it a typical norm
    free   29   written by the rest of the network (which reads everything)

Heads (4 per layer, head_dim 128, RoPE theta 1e8):
  layer 0, heads 0–3 attend to offsets 1–4 and write codes into QW/KW blocks;
  layer 1, head 0 attends to offset 4 and copies QW/KW blocks 0–3 to 4–7;
  layer 2, head 0 attends to offset 8 and copies blocks 0–7 to 8–15;
  layer 3, head 0 compares QW at the cursor with KW everywhere (in the slowest RoPE
  dimensions, which hardly rotate over 512 positions) and copies E of the best match
  into OUT, or rests on <|bos|> when fewer than ~10 of 16 blocks match.
A positional head's query and key come from CONST alone, in the fastest RoPE pairs,
with key phases chosen so that the score peaks at the wanted offset.

So the base continues any 16-byte context it has seen before: with "mira's door code
is 4412." earlier in the prompt, "mira's door code is" is followed by " 4412".

:func:`protect` holds the machinery fixed during pre-training with gradient masks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HIDDEN = 256
HEADS = 4
HEAD_DIM = 128
ROPE_THETA = 1e8
CONST, BOSF = 0, 1
BOSN = 226  # <|bos|> only: gives it a typical norm, so RMSNorm does not blow it up
E = slice(2, 50)
QW = slice(50, 114)
KW = slice(114, 178)
OUT = slice(178, 226)
BLOCKS, CODE = 16, 4  # window length in tokens, hash code size per token
# Dims only the circuit writes (their embedding columns and norm weights stay fixed too):
# E because the copy head copies it, OUT because lm_head's fixed OUT columns read the
# copy there. The rest of the network reads everything and writes the free dims.
PROTECTED = [
    CONST,
    BOSF,
    BOSN,
    *range(E.start, E.stop),
    *range(QW.start, QW.stop),
    *range(KW.start, KW.stop),
    *range(OUT.start, OUT.stop),
]

_POS_FREQS = 6  # highest RoPE pairs used by positional heads
_POS_PAIR_SCORE = 15.0  # logit per pair at the wanted offset: ≥95% attention there
_MATCH_BLOCK_SCORE = 3.0  # logit per matching 4-dim block in the copy head
_SINK_BLOCKS = 10.0  # the <|bos|> sink scores like this many matching blocks
_COPY_LOGIT = 12.0  # logit the copied token gets from lm_head
# A large constant dominates every position's RMS, so RMSNorm scales all positions
# alike and positional scores do not depend on what a position holds.
_CONST = 4.0


def _blk(space: slice, b: int, n: int = 1) -> slice:
    start = space.start + b * CODE
    return slice(start, start + n * CODE)


def _low_freq_dims(n: int) -> list[int]:
    """The n head dimensions whose RoPE rotation is slowest (both halves of each pair)."""
    half = HEAD_DIM // 2
    pairs = list(range(half - 1, -1, -1))  # slowest first
    dims: list[int] = []
    for p in pairs:
        dims += [p, p + half]
        if len(dims) >= n:
            return dims[:n]
    raise ValueError("head too small")


def _rms_inputs(model: nn.Module, ids: torch.Tensor) -> list[float]:
    """Mean RMS of the residual stream entering each layer (bos positions excluded)."""
    found: list[float] = []
    hooks = []
    mask = ids != model.config.bos_token_id

    def hook(_mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        found.append(x.pow(2).mean(-1).sqrt()[mask].mean().item())

    for layer in model.model.layers:
        hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return found


def _positional_qk(attn: nn.Module, head: int, offset: int, rms: float, inv_freq: torch.Tensor) -> None:
    a = rms * math.sqrt(_POS_PAIR_SCORE * math.sqrt(HEAD_DIM))
    half = HEAD_DIM // 2
    for f in range(_POS_FREQS):
        th = float(inv_freq[f])
        attn.q_proj.weight[head * HEAD_DIM + f, CONST] = a / _CONST
        # Keys read CONST - BOSF, which is 0 on <|bos|>: a positional head never rests there.
        for col, sign in ((CONST, 1.0), (BOSF, -1.0)):
            w = a / _CONST if col == CONST else a
            attn.k_proj.weight[head * HEAD_DIM + f, col] = sign * w * math.cos(offset * th)
            attn.k_proj.weight[head * HEAD_DIM + f + half, col] = sign * w * math.sin(offset * th)


def _copy_vo(attn: nn.Module, head: int, src: list[int], dst: list[list[int]], rms: float) -> None:
    """Value dim k of ``head`` reads residual dim src[k]; output dim k writes to every dim in dst[k]."""
    for k, (s, ds) in enumerate(zip(src, dst, strict=True)):
        attn.v_proj.weight[head * HEAD_DIM + k, s] = rms
        for d in ds:
            attn.o_proj.weight[d, head * HEAD_DIM + k] = 1.0


def _clear_head(attn: nn.Module, head: int) -> None:
    rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        proj.weight[rows] = 0.0
    attn.o_proj.weight[:, rows] = 0.0


CIRCUIT_HEADS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (2, 0), (3, 0))


def _identity_codebook(vocab: int, sample_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Unit token-identity vectors for E: exactly orthogonal for the most frequent tokens.

    The copy head's logit for token t is proportional to e_t · e_copied, so two
    identities that overlap (say the digits 3 and 9) would let a copied 3 come out
    as a 9. The |E| most frequent tokens of typical text get orthonormal vectors;
    the rest are random unit vectors.
    """
    dim = E.stop - E.start
    counts = torch.bincount(sample_ids.flatten(), minlength=vocab)[:vocab].double()
    counts[:256] += torch.rand(256, generator=generator, dtype=torch.float64) * 1e-3  # stable tie-break
    top = torch.argsort(counts, descending=True)[:dim]
    e = torch.randn(vocab, dim, generator=generator)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0]
    e[top] = basis
    return e / e.norm(dim=1, keepdim=True)


def install(
    model: nn.Module,
    sample_ids: torch.Tensor,
    generator: torch.Generator,
    freq_ids: torch.Tensor | None = None,
) -> None:
    """Write the circuit into a freshly initialised model (see the module docstring).

    ``sample_ids`` (a few rows of typical text starting with <|bos|>) calibrates the
    weight scales to the residual stream's actual RMS at each layer.
    """
    cfg = model.config
    assert cfg.hidden_size == HIDDEN and cfg.num_attention_heads == HEADS and cfg.head_dim == HEAD_DIM
    inv_freq = model.model.rotary_emb.inv_freq.detach().double()
    bos = cfg.bos_token_id
    with torch.no_grad():
        # Free branches start silent (zero output), so the circuit is what the first steps see.
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.zero_()
        vocab = emb.shape[0]
        emb[:, CONST] = _CONST
        emb[bos, BOSF] = 1.0
        emb[bos, BOSN] = 1.0
        e = _identity_codebook(vocab, sample_ids if freq_ids is None else freq_ids, generator)
        code = torch.randn(vocab, CODE, generator=generator)
        code = code / code.norm(dim=1, keepdim=True)
        e[bos] = 0.0
        code[bos] = 0.0
        emb[:, E] = e
        emb[:, _blk(QW, 0)] = code
        for layer, head in CIRCUIT_HEADS:
            _clear_head(model.model.layers[layer].self_attn, head)

        # Layer 0: offsets 1..4. Offset o writes the code of token i-o into QW block o
        # (o ≤ 3) and KW block o-1.
        rms = _rms_inputs(model, sample_ids)
        attn = model.model.layers[0].self_attn
        code_src = list(range(QW.start, QW.start + CODE))
        for head, offset in enumerate((1, 2, 3, 4)):
            _positional_qk(attn, head, offset, rms[0], inv_freq)
            dst = []
            for k in range(CODE):
                targets = [_blk(KW, offset - 1).start + k]
                if offset <= 3:
                    targets.append(_blk(QW, offset).start + k)
                dst.append(targets)
            _copy_vo(attn, head, code_src, dst, rms[0])

        # Layers 1 and 2: offset n copies blocks 0..n-1 of QW and KW into blocks n..2n-1.
        for layer, n in ((1, 4), (2, 8)):
            rms = _rms_inputs(model, sample_ids)
            attn = model.model.layers[layer].self_attn
            _positional_qk(attn, 0, n, rms[layer], inv_freq)
            src, dst = [], []
            for space in (QW, KW):
                for k in range(n * CODE):
                    src.append(space.start + k)
                    dst.append([space.start + n * CODE + k])
            _copy_vo(attn, 0, src, dst, rms[layer])

        # Layer 3: the prefix-matching copy head.
        rms = _rms_inputs(model, sample_ids)
        attn = model.model.layers[3].self_attn
        width = QW.stop - QW.start
        dims = _low_freq_dims(width + 2)
        beta = rms[3] * math.sqrt(_MATCH_BLOCK_SCORE * math.sqrt(HEAD_DIM))
        for k in range(width):
            attn.q_proj.weight[dims[k], QW.start + k] = beta
            attn.k_proj.weight[dims[k], KW.start + k] = beta
        # Sink: a constant in the query meets BOSF in the key (only <|bos|> has it), scoring
        # like _SINK_BLOCKS matching blocks. <|bos|>'s RMS comes from CONST, BOSF and BOSN.
        rms_bos = math.sqrt((_CONST**2 + 2.0) / HIDDEN)
        sink = _SINK_BLOCKS * _MATCH_BLOCK_SCORE * math.sqrt(HEAD_DIM)
        g = math.sqrt(sink * rms[3] * rms_bos)
        attn.q_proj.weight[dims[width], CONST] = g / _CONST
        attn.k_proj.weight[dims[width], BOSF] = g
        _copy_vo(
            attn, 0, list(range(E.start, E.stop)), [[OUT.start + k] for k in range(E.stop - E.start)], rms[3]
        )

        # lm_head reads the copied identity: logit_t = _COPY_LOGIT · e_t · copied.
        rms_final = _final_rms(model, sample_ids)
        model.lm_head.weight[:, OUT] = _COPY_LOGIT * rms_final * e


def _final_rms(model: nn.Module, ids: torch.Tensor) -> float:
    out: list[float] = []
    mask = ids != model.config.bos_token_id
    h = model.model.norm.register_forward_pre_hook(
        lambda _m, args: out.append(args[0].pow(2).mean(-1).sqrt()[mask].mean().item())
    )
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return out[0]


def protect(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Gradient masks that keep the circuit fixed while everything else trains.

    Weight decay must be 0 for masked parameters (decay would still move them).
    """
    handles = []

    def masked(param: torch.Tensor, mask: torch.Tensor) -> None:
        keep = (~mask).to(param.dtype)
        handles.append(param.register_hook(lambda g: g * keep))

    prot = torch.zeros(HIDDEN, dtype=torch.bool)
    prot[PROTECTED] = True
    emb = model.model.embed_tokens.weight
    masked(emb, prot.expand_as(emb))
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        heads = [h for (li, h) in CIRCUIT_HEADS if li == i]
        rows = torch.zeros(HEADS * HEAD_DIM, dtype=torch.bool)
        for h in heads:
            rows[h * HEAD_DIM : (h + 1) * HEAD_DIM] = True
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            masked(proj.weight, rows[:, None].expand_as(proj.weight))
        o = attn.o_proj.weight  # [HIDDEN, HEADS*HEAD_DIM]
        masked(o, prot[:, None].expand_as(o) | rows[None, :].expand_as(o))
        d = layer.mlp.down_proj.weight  # [HIDDEN, intermediate]
        masked(d, prot[:, None].expand_as(d))
        masked(layer.input_layernorm.weight, prot)
    final = prot.clone()
    final[OUT] = True
    masked(model.model.norm.weight, final)
    head = model.lm_head.weight  # [vocab, HIDDEN]
    cols = torch.zeros(HIDDEN, dtype=torch.bool)
    cols[OUT] = True
    masked(head, cols[None, :].expand_as(head))
    return handles
