"""The pack loop: Ray Train's ``train_loop_per_worker`` for one pack of many models.

Read it top to bottom: load the base once → load frozen ancestors and trainable members
into the engine's slots → pin each member's data → evaluate → step → evaluate → report.
Every step is one forward and one backward through the engine for all members at once;
what must stay per member stays per member: its loss mean, its gradient clip, its AdamW
state and its learning-rate schedule.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fleet._threads import torch_threads
from fleet.config import FleetConfig
from fleet.data.corpus import REPLAY_INSTRUCTIONS, general_passages
from fleet.train.augment import ensure_forms, mode_for
from fleet.train.data import (
    RowStream,
    bucketed,
    collate,
    eval_batches,
    general_chat_rows,
    general_rows,
    member_data,
)
from fleet.train.pack import AdapterRef, PackSpec, cpu_threads
from fleet.train.schedule import lr_at
from fleet.types import lineage

RESULT_FILE = "result.json"
GENERAL_POOL, GENERAL_HELDOUT = 64, 4  # general-text passages: replayed per pack / measured per member
STATE_FILE = "state.pt"


def train_pack_loop(config: dict[str, Any]) -> None:
    """Ray Train's entry point: resume from the run's checkpoint if there is one, report to it."""
    import ray.train

    progress = config.get("progress")
    if progress is not None:  # the worker is placed: the run has started
        progress.update.remote(config["pack"]["name"], {"phase": "setup", "pid": os.getpid()})
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    run_pack(
        PackSpec.from_dict(config["pack"]),
        FleetConfig.model_validate(config["cfg"]),
        state=state,
        report=_train_report,
        progress=progress,
        eval_every=int(config.get("eval_every") or 0),
        kl_lambda=config.get("kl_lambda"),
    )


def run_pack(
    spec: PackSpec,
    cfg: FleetConfig,
    *,
    state: dict | None = None,
    report: Callable[[dict, dict | None, dict | None], None],
    progress=None,
    eval_every: int = 0,
    kl_lambda: float | None = None,
    device: torch.device | None = None,
) -> None:
    """Train one pack. ``report(metrics, state, final)`` receives checkpoints (state set) and the
    end (final set); ``state`` resumes a checkpoint. No Ray here: tests call it directly.

    On CPU the pack computes on one intra-op thread per whole CPU it was given, whatever the
    process has set: a float32 matmul's result depends on how many threads split it, so this is
    what makes a run resumed on another worker, or on another node, continue with the same numbers.
    """
    device = device or _device()
    with torch_threads(cpu_threads(spec, cfg)) if device.type == "cpu" else nullcontext():
        _run_pack(spec, cfg, state, report, progress, eval_every, kl_lambda, device)


def _run_pack(spec, cfg, state, report, progress, eval_every, kl_lambda, device) -> None:
    from fleet.handles import Fleet
    from fleet.lora import AdapterWeights, SlotAdamW
    from fleet.lora.build import build_engine

    kl_lambda = cfg.sweep.kl_lambda if kl_lambda is None else float(kl_lambda)
    t_setup = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    fl = Fleet(cfg)
    members = spec.members
    keys = [m.train_key for m in members]

    # -- the base, once; then every adapter the pack needs, in slots ---------------------------
    ancestors: dict[str, AdapterRef] = {a.key: a for m in members for a in m.ancestors}
    read = lambda ref: AdapterWeights.from_bytes(*_files(fl.store, ref))  # noqa: E731
    frozen = {key: read(ref) for key, ref in ancestors.items()}
    engine, tokenizer = build_engine(
        cfg,
        slots=len(members) + len(frozen),
        ranks=[m.rank for m in members] + [w.rank for w in frozen.values()],
        device=device,
        path=cfg.base_path,
    )
    model = engine.model
    for key, w in frozen.items():
        engine.load(key, w, trainable=False)  # ancestors are frozen: the hierarchy stays stratified

    for m in members:
        if state:
            w = AdapterWeights.from_bytes(*state["adapters"][m.model_id])
        elif m.start:
            w = read(m.start)  # continual learning: start from the active version
        else:
            w = AdapterWeights.fresh(
                model,
                rank=m.rank,
                alpha=m.alpha,
                target_modules=cfg.lora.target_modules,
                use_rslora=cfg.lora.use_rslora,
                seed=_seed(m.seed, m.model_id),
            )
        engine.load(m.train_key, w, trainable=True)
    # Each member's rows use [company, team, own] slots (levels it lacks are -1).
    slot_rows = torch.tensor(
        [
            [engine.slot(a.key) for a in m.ancestors]
            + [-1] * (2 - len(m.ancestors))
            + [engine.slot(m.train_key)]
            for m in members
        ]
    )

    opt = SlotAdamW(engine, keys, weight_decay=max(m.learning_schedule.weight_decay for m in members))
    if state:
        opt.load_state_dict(state["optimizer"])

    # -- the data: pinned by item ids, so a restarted worker reads exactly the same rows -------
    snaps = fl.registry.training_snapshot(
        [m.model_id for m in members],
        replay_fraction={m.model_id: m.replay_fraction for m in members},
        seed=cfg.train.seed,
        pins={m.model_id: (m.watermark, m.upto) for m in members},
    )
    # Every document's training forms (questions with the base's answers, paraphrases): read from
    # the registry, or written now by the base (no adapter rows) and stored for every later run.
    mode = mode_for(cfg, tokenizer)
    if progress is not None and mode == "base":
        progress.update.remote(spec.name, {"phase": "augment", "pid": os.getpid()})
    above = {}  # each member's items → the documents of its lineage above it (team, company)
    if mode == "base":
        docs: dict[str, list[str]] = {}  # each ancestor's documents, read once for all its members
        for m in members:
            for a in lineage(m.model_id)[:-1]:
                if a not in docs:
                    docs[a] = [it["text"] for it in fl.registry.items(a) if it["kind"] != "conversation"]
            texts = [t for a in lineage(m.model_id)[:-1] for t in docs[a]]
            for it in (*snaps[m.model_id].new_items, *snaps[m.model_id].old_items):
                above[it.id] = texts
    # Each item → its member's items (one list per member): a later document may revise what an
    # earlier one states.
    history = {}
    for s in snaps.values():
        member_items = [*s.earlier_items, *s.new_items]
        history.update({it.id: member_items for it in (*s.new_items, *s.old_items)})
    forms = ensure_forms(
        fl.registry,
        engine,
        tokenizer,
        [it for s in snaps.values() for it in (*s.new_items, *s.old_items)],
        base_model=cfg.base.name,
        mode=mode,
        seed=cfg.train.seed,
        context=above,
        history=history,
    )
    data = [
        member_data(
            m.model_id,
            snaps[m.model_id].new_items,
            snaps[m.model_id].old_items,
            tokenizer,
            context_length=cfg.data.context_length,
            heldout_fraction=cfg.data.heldout_fraction,
            forms=forms,
            seed=cfg.train.seed,
            personal=mode == "base",  # chat questions: an individual's owner asks in the first person
            earlier=snaps[m.model_id].earlier_items,
        )
        for m in members
    ]
    streams = [
        RowStream(d.train, seed=f"{cfg.train.seed}:{m.model_id}") for m, d in zip(members, data, strict=True)
    ]
    # General text (never trained on with cross-entropy): each member's own stream over one pool,
    # its only loss the KL toward the base; a few held-out passages measure its forgetting.
    tiny = len(tokenizer) < 1000
    general_per_member = cfg.train.general_rows_per_member
    general = general_rows(
        tokenizer, general_passages(GENERAL_POOL, split="replay", tiny=tiny), cfg.data.context_length
    )
    general_streams = [RowStream(general, seed=f"{cfg.train.seed}:{m.model_id}:general") for m in members]
    # On a real base, the base's own answers to general instructions too (chat form, as the private
    # rows are): `chat_rows_per_member` of them per member and step.
    chat_per_member = cfg.train.chat_rows_per_member
    if not tiny and chat_per_member:
        chat = _chat_replay(engine, tokenizer, cfg.data.context_length)
        general_streams += [RowStream(chat, seed=f"{cfg.train.seed}:{m.model_id}:chat") for m in members]
    takes = (general_per_member, chat_per_member)  # rows a step of each general stream kind
    general_heldout = general_rows(
        tokenizer, general_passages(GENERAL_HELDOUT, split="heldout", tiny=tiny), cfg.data.context_length
    )
    pad = tokenizer.pad_token_id
    rows_per_member = cfg.train.rows_per_member

    def judge(recall_only: bool = False):
        return evaluate(
            engine, model, data, slot_rows, pad, device, general=general_heldout, recall_only=recall_only
        )

    t_eval = time.perf_counter()
    before = state["before"] if state else judge()
    eval_s = time.perf_counter() - t_eval
    start = state["step"] if state else 0
    tokens = list(state["tokens"]) if state else [0] * len(members)
    stopped = list(state.get("stopped", [None] * len(members))) if state else [None] * len(members)
    if state:  # every member's data stream continues exactly where the checkpoint left it
        for stream, saved in zip(streams + general_streams, state["streams"], strict=False):
            stream.restore(saved)

    # -- the loop ------------------------------------------------------------------------------
    setup_s = t_eval - t_setup
    t_train = time.perf_counter()
    total = spec.steps
    model.train()
    t0, last_loss = time.time(), [float("nan")] * len(members)
    check_every = cfg.train.eval_every
    for step in range(start, total):
        active = [i for i, m in enumerate(members) if stopped[i] is None and step < m.learning_schedule.steps]
        if not active:
            break
        rows = {i: streams[i].take(rows_per_member) for i in active}
        kl_w = torch.tensor([m.kl_weight for m in members], device=device)
        cd_w = torch.tensor([m.learning_schedule.distill_weight for m in members], device=device)
        for i in active:
            if members[i].kl_weight > 0:
                for j in range(i, len(general_streams), len(members)):  # general text, then chat replay
                    rows[i] = rows[i] + general_streams[j].take(takes[j // len(members)])
        # Each member's own means: a member with long rows does not outweigh one with short.
        n_M = torch.zeros(len(members), device=device)
        g_M = torch.zeros(len(members), device=device)
        for i, rs in rows.items():
            n_M[i] = sum(r.targets for r in rs if not r.general)
            g_M[i] = sum(1 for r in rs if r.general)  # general rows count once each (see _member_row_kl)
        loss_M = torch.zeros(len(members), device=device)
        # One forward/backward per length bucket (private and general rows apart), every member's rows
        # of that bucket together: padding stays low, and a row is always computed at its bucket's
        # length, so a member's numbers do not depend on who else is in the pack (packed == alone).
        for batch, is_general in bucketed(rows, pad):
            batch = batch.to(device)
            with engine.rows(slot_rows[batch.member_B.cpu()]):
                logits_BTV = model(input_ids=batch.ids_BT, attention_mask=batch.attention_BT).logits.float()
                if is_general:
                    # KL toward the base, on general text only: keeps what the base does where nothing
                    # private is asked, and never fights the private rows' wanted change.
                    with engine.rows(torch.full((len(batch.member_B), 1), -1)), torch.no_grad():
                        base_BTV = model(
                            input_ids=batch.ids_BT, attention_mask=batch.attention_BT
                        ).logits.float()
                    kl_M = _member_row_kl(base_BTV, logits_BTV, batch.mask_BT, batch.member_B, len(members))
                    part_M = kl_w * kl_M / g_M.clamp(min=1)
                else:
                    # Cross-entropy on the target tokens only (answers, assistant turns, documents), plus
                    # the KL to the base-with-the-document's top-k on generated answers.
                    nll_M, _ = _member_nll(
                        logits_BTV, batch.ids_BT, batch.mask_BT, batch.member_B, len(members)
                    )
                    cd_M = _member_distill(logits_BTV, batch, len(members))
                    part_M = (nll_M + cd_w * cd_M) / n_M.clamp(min=1)
                part_M.sum().backward()
            loss_M += part_M.detach()
        # Clip per member: a global clip would let one tenant's gradients shrink another's.
        opt.clip_({keys[i]: members[i].learning_schedule.max_grad_norm for i in active})
        opt.set_lr({keys[i]: lr_at(step, members[i].learning_schedule) for i in active})
        opt.step([keys[i] for i in active])
        opt.zero_grad()
        for i in active:
            tokens[i] += sum(len(r) for r in rows[i])
            last_loss[i] = float(loss_M[i])
        done = step + 1
        if check_every and done % check_every == 0 and done < total:
            # Stop a member once it answers its held-out questions (worded unlike any trained row):
            # more steps would only add forgetting. Members without held-out questions run their steps.
            now_eval = judge(recall_only=True)
            for i in active:
                probe = now_eval[i]["recall"]
                if probe is not None and probe >= cfg.train.stop_recall:
                    stopped[i] = done
        if progress is not None and (done % 5 == 0 or done == total):
            progress.update.remote(
                spec.name,
                {
                    "step": done,
                    "steps": total,
                    "pid": os.getpid(),
                    "loss": _mean(last_loss),
                    "tokens": sum(tokens),
                    "elapsed_s": time.time() - t0,
                },
            )
        checkpoint = done % cfg.train.checkpoint_every == 0 and done < total
        if checkpoint or (eval_every and done % eval_every == 0 and done < total):
            now = {"step": done, "loss": _mean(last_loss)}
            if eval_every:
                # Sweeps: the objective as training goes, so that ASHA can stop a bad trial early;
                # every report carries it (Tune refuses a result without its metric).
                now.update(_objective(judge(), kl_lambda))
            if checkpoint:
                _report(
                    engine, opt, members, keys, streams + general_streams, before, done, tokens, now,
                    report=report, stopped=stopped,
                )  # fmt: skip
            else:
                report(now, None, None)

    model.eval()
    train_s = time.perf_counter() - t_train
    t_eval = time.perf_counter()
    after = judge()
    eval_s += time.perf_counter() - t_eval
    metrics = {
        # Where the worker's time went (base and adapters loading, held-out evaluations, steps).
        "setup_s": round(setup_s, 2),
        "eval_s": round(eval_s, 2),
        "train_s": round(train_s, 2),
        "step": total,
        "loss": _mean(last_loss),
        "heldout_before": _mean([b["loss"] for b in before]),
        "heldout_after": _mean([a["loss"] for a in after]),
        "kl_after": _mean([a["kl"] for a in after]),
        "recall_after": _mean([a["recall"] for a in after if a["recall"] is not None]),
        "general_dnll_after": _mean([a["general_dnll"] for a in after]),
        **_objective(after, kl_lambda),
    }
    members_out = {
        m.model_id: {
            "heldout_before": before[i]["loss"],
            "heldout_after": after[i]["loss"],
            "kl_base": after[i]["kl"],  # on general text (the drift gate's); on private rows below
            "kl_heldout": after[i]["kl_private"],
            "top1_base": after[i]["top1"],
            "recall_before": before[i]["recall"],
            "recall_after": after[i]["recall"],
            "general_dnll": after[i]["general_dnll"],
            "stopped_at": stopped[i],
            "tokens": tokens[i],
            "train_rows": len(data[i].train),
            "heldout_rows": len(data[i].heldout),
            "probes": len(data[i].probes),
        }
        for i, m in enumerate(members)
    }
    _report(
        engine, opt, members, keys, streams + general_streams, before, total, tokens, metrics,
        final=members_out, report=report, stopped=stopped,
    )  # fmt: skip


@torch.no_grad()
def _chat_replay(engine, tokenizer, context_length: int, max_new_tokens: int = 48) -> list:
    """The base's own answers to general instructions (``REPLAY_INSTRUCTIONS``), as KL-only rows."""
    from fleet.base.tokenizer import chat_ids
    from fleet.lora import generate

    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in REPLAY_INSTRUCTIONS]
    out = generate(engine, tokenizer, prompts, [[-1]] * len(prompts), max_new_tokens=max_new_tokens)
    return general_chat_rows(tokenizer, prompts, [list(g.token_ids) for g in out], context_length)


def _objective(evals: list[dict[str, Any]], kl_lambda: float) -> dict[str, float]:
    """What sweeps minimize: the held-out questions a member misses, plus λ × its forgetting
    (ΔNLL on general text, when positive). Members without held-out questions count their
    held-out loss instead."""
    recalls = [e["recall"] for e in evals if e["recall"] is not None]
    loss, kl = _mean([e["loss"] for e in evals]), _mean([e["kl"] for e in evals])
    forgetting = max(0.0, _mean([e["general_dnll"] for e in evals]))
    miss = (1.0 - _mean(recalls)) if recalls else loss
    return {"heldout": loss, "kl": kl, "objective": miss + kl_lambda * forgetting}


def _member_nll(logits_BTV, ids_BT, mask_BT, member_B, n_members: int):
    """Summed next-token NLL over each member's target tokens, and their counts."""
    logp = F.cross_entropy(logits_BTV[:, :-1].transpose(1, 2), ids_BT[:, 1:], reduction="none")
    m_BT = mask_BT[:, 1:].to(logp.dtype)
    per_row = (logp * m_BT).sum(1)
    nll_M = torch.zeros(n_members, device=logp.device).index_add(0, member_B, per_row)
    count_M = torch.zeros(n_members, device=logp.device).index_add(0, member_B, m_BT.sum(1))
    return nll_M, count_M


def _kl_BT(base_BTV, logits_BTV, mask_BT):
    """Per-token KL(base ‖ model) at the target tokens (0 elsewhere), and the target mask."""
    lp_base = F.log_softmax(base_BTV[:, :-1], -1)
    lp_model = F.log_softmax(logits_BTV[:, :-1], -1)
    m_BT = mask_BT[:, 1:]
    return (lp_base.exp() * (lp_base - lp_model)).sum(-1) * m_BT, m_BT


def _member_kl(base_BTV, logits_BTV, mask_BT, member_B, n_members: int):
    """Summed per-token KL(base ‖ model) per member over the target tokens."""
    kl_BT, _ = _kl_BT(base_BTV, logits_BTV, mask_BT)
    return torch.zeros(n_members, device=kl_BT.device).index_add(0, member_B, kl_BT.sum(1))


def _member_row_kl(base_BTV, logits_BTV, mask_BT, member_B, n_members: int):
    """Per member, the sum over its rows of each row's mean per-token KL(base ‖ model): the
    training penalty on general rows, where every row weighs the same, so a short chat answer
    replayed is not outweighed by a long passage of text (counted by tokens, a 40-token answer
    beside a 250-token speech would carry a seventh of the penalty, and chat is what members are
    asked in)."""
    kl_BT, m_BT = _kl_BT(base_BTV, logits_BTV, mask_BT)
    per_row = kl_BT.sum(1) / m_BT.sum(1).clamp(min=1)
    return torch.zeros(n_members, device=kl_BT.device).index_add(0, member_B, per_row)


def _member_distill(logits_BTV, batch, n_members: int):
    """Summed KL(teacher ‖ model) over the teacher's top-k (both renormalised on those k tokens) at
    each answer token that carries the base-with-the-document's distribution (context distillation)."""
    out = torch.zeros(n_members, device=logits_BTV.device)
    if batch.top_at.numel() == 0:
        return out
    b, t = batch.top_at[:, 0], batch.top_at[:, 1]
    student_NV = logits_BTV[b, t - 1]  # position t-1 predicts token t
    q_NK = F.log_softmax(student_NV.gather(1, batch.top_idx_NK), -1)
    p_NK = F.log_softmax(batch.top_logp_NK, -1)
    kl_N = (p_NK.exp() * (p_NK - q_NK)).sum(-1)
    return out.index_add(0, batch.member_B[b], kl_N)


@torch.no_grad()
def evaluate(
    engine, model, data, slot_rows, pad: int, device, batch_rows: int = 32, general=(), recall_only=False
) -> list[dict[str, Any]]:
    """Per member: held-out loss on target tokens, KL(base ‖ model) and top-1 agreement with the
    base there, recall of held-out questions (every answer token the model's greedy choice, which
    is exactly what greedy decoding of the answer needs; None without held-out questions), and
    ΔNLL on held-out general text (forgetting)."""
    was_training = model.training
    model.eval()
    n = len(data)
    nll, cnt, kl, agree = (torch.zeros(n, device=device) for _ in range(4))
    recall: list[float | None] = [None] * n
    dnll = [0.0] * n

    def of_batch(batch, slots_B):
        with engine.rows(slots_B):
            return model(input_ids=batch.ids_BT, attention_mask=batch.attention_BT).logits.float()

    def logits(rows, slots_B):
        batch = collate([rows], pad).to(device)
        return batch, of_batch(batch, slots_B)

    if recall_only:  # the stop check while training: held-out questions only
        general = ()
    # General text: the base's logits once, then each member's ΔNLL, KL(base ‖ member) and top-1
    # agreement there (what the publication gate's drift caps judge: how far the member moved
    # where nothing private is asked; on its private rows moving is the point).
    base_general = _general_logits(logits, general, torch.full((1, 1), -1)) if general else []
    g_stats: list[tuple[float, float, float] | None] = [None] * n
    for i, d in enumerate(data):
        member_B = None
        for rows in eval_batches([] if recall_only else d.heldout, batch_rows):
            member_B = torch.full((len(rows),), i, device=device)
            batch, lg = logits(rows, slot_rows[[i] * len(rows)])
            _, base = logits(rows, torch.full((len(rows), 1), -1))
            s, c = _member_nll(lg, batch.ids_BT, batch.mask_BT, member_B, n)
            nll += s
            cnt += c
            kl += _member_kl(base, lg, batch.mask_BT, member_B, n)
            same = (lg[:, :-1].argmax(-1) == base[:, :-1].argmax(-1)).float() * batch.mask_BT[:, 1:]
            agree[i] += same.sum()
        if d.probes:
            hits = 0
            for rows in eval_batches(d.probes, batch_rows):
                batch, lg = logits(rows, slot_rows[[i] * len(rows)])
                right = (lg[:, :-1].argmax(-1) == batch.ids_BT[:, 1:]) | (batch.mask_BT[:, 1:] == 0)
                hits += int(right.all(1).sum())
            recall[i] = hits / len(d.probes)
        if general:
            g_stats[i] = _general_stats(of_batch, base_general, slot_rows[[i]])
            dnll[i] = g_stats[i][0]
    model.train(was_training)
    c = cnt.clamp(min=1)
    out = []
    for i in range(n):
        private_kl, private_top1 = float(kl[i] / c[i]), float(agree[i] / c[i])
        out.append(
            {
                "loss": float(nll[i] / c[i]),
                "kl": private_kl if g_stats[i] is None else g_stats[i][1],
                "top1": private_top1 if g_stats[i] is None else g_stats[i][2],
                "kl_private": private_kl,
                "recall": recall[i],
                "general_dnll": dnll[i],
            }
        )
    return out


def _general_logits(logits, rows, slots_1L) -> list:
    """The base's (batch, logits) over general-text rows, in chunks."""
    return [logits(chunk, slots_1L.expand(len(chunk), -1)) for chunk in eval_batches(list(rows), 16)]


def _general_stats(of_batch, base_chunks, slots_1L) -> tuple[float, float, float]:
    """A member's ΔNLL over the base, KL(base ‖ member) and top-1 agreement on general text."""
    dnll = kl = agree = count = 0.0
    for batch, base in base_chunks:
        zero_B = torch.zeros(batch.ids_BT.shape[0], dtype=torch.long, device=base.device)
        with_member = of_batch(batch, slots_1L.expand(len(zero_B), -1))
        s, c = _member_nll(with_member, batch.ids_BT, batch.mask_BT, zero_B, 1)
        s0, _ = _member_nll(base, batch.ids_BT, batch.mask_BT, zero_B, 1)
        dnll += float(s[0] - s0[0])
        kl += float(_member_kl(base, with_member, batch.mask_BT, zero_B, 1)[0])
        same = (with_member[:, :-1].argmax(-1) == base[:, :-1].argmax(-1)).float() * batch.mask_BT[:, 1:]
        agree += float(same.sum())
        count += float(c[0])
    count = max(1.0, count)
    return dnll / count, kl / count, agree / count


def _report(
    engine, opt, members, keys, streams, before, step, tokens, metrics, final=None, *, report, stopped
) -> None:
    """Checkpoint every member's adapter and optimizer state (and, at the end, the results)."""
    state = {
        "step": step,
        "tokens": list(tokens),
        "stopped": list(stopped),
        "before": before,
        "adapters": {m.model_id: engine.export(k).to_bytes() for m, k in zip(members, keys, strict=True)},
        "optimizer": opt.state_dict(),
        "streams": [s.state() for s in streams],
    }
    report(metrics, state, final)


def _train_report(metrics: dict, state: dict | None, final: dict | None) -> None:
    """Ray Train's side of ``report``: metrics, and a checkpoint directory when there is state."""
    import ray.train
    from ray.train import Checkpoint

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_FILE)
        if final is not None:
            (Path(d) / RESULT_FILE).write_text(json.dumps({"members": final, "metrics": metrics}))
        ray.train.report({**metrics, "final": final is not None}, checkpoint=Checkpoint.from_directory(d))


def _files(store, ref: AdapterRef) -> tuple[bytes, bytes]:
    f = store.read_version(ref.uri, ref.sha256)
    return f.config, f.weights


def _seed(seed: int, model_id: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{model_id}".encode()).digest()[:4], "big")


def _mean(xs) -> float:
    xs = [x for x in xs if x == x]
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _device() -> torch.device:
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except Exception:  # outside a Train worker (direct calls in tests)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
