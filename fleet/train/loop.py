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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fleet.config import FleetConfig
from fleet.train.data import RowStream, bucketed, collate, eval_batches, member_data
from fleet.train.pack import AdapterRef, PackSpec
from fleet.train.schedule import lr_at

RESULT_FILE = "result.json"
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
    end (final set); ``state`` resumes a checkpoint. No Ray here: tests call it directly."""
    from fleet.base import load_base, resolve_dtype
    from fleet.context import Fleet
    from fleet.lora import AdapterWeights, LoraEngine, SlotAdamW

    kl_lambda = cfg.sweep.kl_lambda if kl_lambda is None else float(kl_lambda)
    t_setup = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    device = device or _device()
    fl = Fleet(cfg)
    members = spec.members
    keys = [m.train_key for m in members]

    # -- the base, once; then every adapter the pack needs, in slots ---------------------------
    model, tokenizer = load_base(cfg.base_path, device=device, dtype=resolve_dtype(cfg.base.dtype, device))
    ancestors: dict[str, AdapterRef] = {a.key: a for m in members for a in m.ancestors}
    read = lambda ref: AdapterWeights.from_bytes(*_files(fl.store, ref))  # noqa: E731
    frozen = {key: read(ref) for key, ref in ancestors.items()}
    engine = LoraEngine(
        model,
        target_modules=cfg.lora.target_modules,
        max_slots=len(members) + len(frozen),
        max_rank=max([m.rank for m in members] + [w.rank for w in frozen.values()]),
    )
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
    data = [
        member_data(
            m.model_id,
            snaps[m.model_id].new_items,
            snaps[m.model_id].old_items,
            tokenizer,
            context_length=cfg.data.context_length,
            heldout_fraction=cfg.data.heldout_fraction,
        )
        for m in members
    ]
    streams = [
        RowStream(d.train, seed=f"{cfg.train.seed}:{m.model_id}") for m, d in zip(members, data, strict=True)
    ]
    pad = tokenizer.pad_token_id
    rows_per_member = cfg.train.rows_per_member

    t_eval = time.perf_counter()
    before = state["before"] if state else evaluate(engine, model, data, slot_rows, pad, device)
    eval_s = time.perf_counter() - t_eval
    start = state["step"] if state else 0
    tokens = list(state["tokens"]) if state else [0] * len(members)
    if state:  # every member's data stream continues exactly where the checkpoint left it
        for stream, saved in zip(streams, state["streams"], strict=True):
            stream.restore(saved)

    # -- the loop ------------------------------------------------------------------------------
    setup_s = t_eval - t_setup
    t_train = time.perf_counter()
    total = spec.steps
    model.train()
    t0, last_loss = time.time(), [float("nan")] * len(members)
    for step in range(start, total):
        active = [i for i, m in enumerate(members) if _trains(m, i, step, tokens)]
        if not active:
            break
        rows = {i: streams[i].take(rows_per_member) for i in active}
        # Each member's own mean: a member with long rows does not outweigh one with short.
        count_M = torch.zeros(len(members), device=device)
        for i, rs in rows.items():
            count_M[i] = sum(len(r) - 1 for r in rs)
        kl_w = torch.tensor([m.kl_weight for m in members], device=device)
        loss_M = torch.zeros(len(members), device=device)
        # One forward/backward per length bucket, every member's rows of that bucket together:
        # padding stays low, and a row is always computed at its bucket's length, so a member's
        # numbers do not depend on who else is in the pack (packed == alone, bit for bit).
        for ids_BT, mask_BT, member_B in bucketed(rows, pad):
            ids_BT, mask_BT, member_B = ids_BT.to(device), mask_BT.to(device), member_B.to(device)
            with engine.rows(slot_rows[member_B.cpu()]):
                logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits.float()
                nll_M, _ = _member_nll(logits_BTV, ids_BT, mask_BT, member_B, len(members))
                part_M = nll_M / count_M.clamp(min=1)
                if bool((kl_w[active] > 0).any()):
                    with engine.rows(torch.full((len(member_B), 1), -1)), torch.no_grad():
                        base_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits.float()
                    kl_M = _member_kl(base_BTV, logits_BTV, mask_BT, member_B, len(members))
                    part_M = part_M + kl_w * kl_M / count_M.clamp(min=1)
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
                now.update(_objective(evaluate(engine, model, data, slot_rows, pad, device), kl_lambda))
            if checkpoint:
                _report(engine, opt, members, keys, streams, before, done, tokens, now, report=report)
            else:
                report(now, None, None)

    model.eval()
    train_s = time.perf_counter() - t_train
    t_eval = time.perf_counter()
    after = evaluate(engine, model, data, slot_rows, pad, device)
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
        **_objective(after, kl_lambda),
    }
    members_out = {
        m.model_id: {
            "heldout_before": before[i]["loss"],
            "heldout_after": after[i]["loss"],
            "kl_base": after[i]["kl"],
            "top1_base": after[i]["top1"],
            "tokens": tokens[i],
            "train_rows": len(data[i].train),
            "heldout_rows": len(data[i].heldout),
        }
        for i, m in enumerate(members)
    }
    _report(
        engine, opt, members, keys, streams, before, total, tokens, metrics, final=members_out, report=report
    )


def _objective(evals: list[dict[str, float]], kl_lambda: float) -> dict[str, float]:
    """What sweeps minimize: held-out loss after training + λ·KL(base ‖ model)."""
    loss, kl = _mean([e["loss"] for e in evals]), _mean([e["kl"] for e in evals])
    return {"heldout": loss, "kl": kl, "objective": loss + kl_lambda * kl}


def _trains(m, i: int, step: int, tokens: list[int]) -> bool:
    """A member steps until its own schedule ends (its data was pinned to its budget already)."""
    return step < m.learning_schedule.steps


def _member_nll(logits_BTV, ids_BT, mask_BT, member_B, n_members: int):
    """Summed next-token NLL and token counts per member (padding masked out)."""
    logp = F.cross_entropy(logits_BTV[:, :-1].transpose(1, 2), ids_BT[:, 1:], reduction="none")
    m_BT = mask_BT[:, 1:].to(logp.dtype)
    per_row = (logp * m_BT).sum(1)
    nll_M = torch.zeros(n_members, device=logp.device).index_add(0, member_B, per_row)
    count_M = torch.zeros(n_members, device=logp.device).index_add(0, member_B, m_BT.sum(1))
    return nll_M, count_M


def _member_kl(base_BTV, logits_BTV, mask_BT, member_B, n_members: int):
    """Summed per-token KL(base ‖ model) per member."""
    lp_base = F.log_softmax(base_BTV[:, :-1], -1)
    lp_model = F.log_softmax(logits_BTV[:, :-1], -1)
    kl_BT = (lp_base.exp() * (lp_base - lp_model)).sum(-1) * mask_BT[:, 1:]
    return torch.zeros(n_members, device=kl_BT.device).index_add(0, member_B, kl_BT.sum(1))


@torch.no_grad()
def evaluate(
    engine, model, data, slot_rows, pad: int, device, batch_rows: int = 32
) -> list[dict[str, float]]:
    """Held-out loss, KL(base ‖ model) and top-1 agreement with the base, per member."""
    was_training = model.training
    model.eval()
    n = len(data)
    nll, cnt, kl, agree = (torch.zeros(n, device=device) for _ in range(4))
    for i, d in enumerate(data):
        for rows in eval_batches(d.heldout, batch_rows):
            ids_BT, mask_BT, _ = collate([rows], pad)
            ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
            member_B = torch.full((len(rows),), i, device=device)
            with engine.rows(slot_rows[[i] * len(rows)]):
                logits = model(input_ids=ids_BT, attention_mask=mask_BT).logits.float()
            with engine.rows(torch.full((len(rows), 1), -1)):
                base = model(input_ids=ids_BT, attention_mask=mask_BT).logits.float()
            s, c = _member_nll(logits, ids_BT, mask_BT, member_B, n)
            nll += s
            cnt += c
            kl += _member_kl(base, logits, mask_BT, member_B, n)
            same = (logits[:, :-1].argmax(-1) == base[:, :-1].argmax(-1)).float() * mask_BT[:, 1:]
            agree[i] += same.sum()
    model.train(was_training)
    c = cnt.clamp(min=1)
    return [
        {"loss": float(nll[i] / c[i]), "kl": float(kl[i] / c[i]), "top1": float(agree[i] / c[i])}
        for i in range(n)
    ]


def _report(
    engine, opt, members, keys, streams, before, step, tokens, metrics, final=None, *, report
) -> None:
    """Checkpoint every member's adapter and optimizer state (and, at the end, the results)."""
    state = {
        "step": step,
        "tokens": list(tokens),
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
