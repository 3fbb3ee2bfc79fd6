"""fleet.base: the tiny offline base (build, load, tokenizer, in-context recall) and base lookup."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import fleet.base.build as build_mod
from fleet.base import (
    CHAT_TEMPLATE,
    _circuit,
    base_fingerprint,
    base_meta,
    build_tiny_base,
    build_tokenizer,
    ensure_base,
    is_causal_lm_dir,
    load_base,
    resolve_device,
    resolve_dtype,
)
from fleet.base.pretrain import PretrainSpec, build_threads, heldout_nll, init_model
from fleet.config import FleetConfig
from fleet.data.synth import general_text, synthetic_org
from fleet.errors import ConfigError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Evaluate with one intra-op thread: these forwards are small, and on a shared
    machine two threads waiting on each other are many times slower. (Builds pin
    their own thread count.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_dir(tiny_base) -> Path:
    """The session's tiny base: the default build (seed 0), what `fleet base build` writes."""
    return tiny_base


@pytest.fixture(scope="module")
def loaded(base_dir):
    return load_base(base_dir)


def _answer_logprob(model, tok, prompt: str, answer: str) -> tuple[float, bool]:
    """Mean log-prob of the answer's tokens, and whether greedy decoding reproduces it."""
    p_ids = tok(prompt)["input_ids"]
    a_ids = tok(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + a_ids])).logits[0, len(p_ids) - 1 : -1]
    logp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(a_ids)[:, None]).mean().item()
    return logp, logits.argmax(-1).tolist() == a_ids  # teacher-forced argmax == greedy completion


def test_loads_offline_with_auto_classes(base_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.tie_word_embeddings is False
    assert len(tok) == model.config.vocab_size
    assert sum(p.numel() for p in model.parameters()) <= 5_000_000
    meta = base_meta(base_dir)
    assert meta["params"] == sum(p.numel() for p in model.parameters())
    if not os.environ.get("FLEET_TEST_BASE"):  # a base built here, not one brought along
        assert meta["steps"] == PretrainSpec().steps and meta["seed"] == 0
    assert math.isfinite(meta["final_loss"])
    assert not list(base_dir.parent.glob(".tiny.*")), "no temporary build directories left behind"


def test_load_base_returns_a_frozen_eval_model(base_dir, loaded):
    model, tok = loaded
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    m16, _ = load_base(base_dir, dtype=torch.bfloat16)
    assert next(m16.parameters()).dtype == torch.bfloat16


@settings(max_examples=60, deadline=None)
@given(text=st.text())
def test_tokenizer_round_trips_any_text(text):
    tok = _tokenizer()
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == text
    if "<|" not in text:
        assert len(ids) == len(text.encode("utf-8")) + 1  # one token per byte
        assert tok.decode(ids, skip_special_tokens=True) == text


@functools.cache
def _tokenizer():
    return build_tokenizer()


def test_saved_tokenizer_matches_and_renders_chat(base_dir):
    tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    sample = "dana-3's locker code is 4821 ✓ \x00"
    assert tok(sample)["input_ids"] == _tokenizer()(sample)["input_ids"]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.chat_template == CHAT_TEMPLATE
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert rendered == "<|bos|><|user|>\nhi<|eos|>\n<|assistant|>\nhello<|eos|>\n"
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    assert tok.convert_tokens_to_ids("<|user|>") != tok.unk_token_id


def test_is_a_language_model_not_noise(loaded):
    model, tok = loaded
    nll = heldout_nll(model, tok, general_text(48, seed=4242))
    uniform = math.log(model.config.vocab_size)
    assert nll < 0.5 * uniform, (nll, uniform)


def test_in_context_recall_beats_the_bare_question(loaded):
    model, tok = loaded
    org = synthetic_org(seed=3)
    facts = org.facts[::5][:40]
    with_doc = [_answer_logprob(model, tok, org.in_context_prompt(f), f.answer) for f in facts]
    bare = [_answer_logprob(model, tok, f.question, f.answer) for f in facts]
    lp_doc = sum(lp for lp, _ in with_doc) / len(facts)
    lp_bare = sum(lp for lp, _ in bare) / len(facts)
    exact_doc = sum(ok for _, ok in with_doc) / len(facts)
    exact_bare = sum(ok for _, ok in bare) / len(facts)
    assert lp_doc > lp_bare + 1.0, (lp_doc, lp_bare)
    assert exact_doc >= 0.5 and exact_bare <= 0.05, (exact_doc, exact_bare)


def test_copy_circuit_recalls_before_any_training():
    tok = _tokenizer()
    model = init_model(tok, seed=1).eval()
    org = synthetic_org(seed=5)
    facts = org.facts[::7][:20]
    assert all(_answer_logprob(model, tok, org.in_context_prompt(f), f.answer)[1] for f in facts)
    assert not any(_answer_logprob(model, tok, f.question, f.answer)[1] for f in facts)


def test_pretraining_leaves_the_circuit_untouched(base_dir, loaded):
    model, tok = loaded
    with build_threads():  # the build's initialisation, computed on as many threads as the build's
        fresh = init_model(tok, seed=0)
    for layer, head in _circuit.CIRCUIT_HEADS:
        rows = slice(head * _circuit.HEAD_DIM, (head + 1) * _circuit.HEAD_DIM)
        for name in ("q_proj", "k_proj", "v_proj"):
            a = getattr(model.model.layers[layer].self_attn, name).weight[rows]
            b = getattr(fresh.model.layers[layer].self_attn, name).weight[rows]
            assert torch.equal(a, b), (layer, head, name)
    prot = _circuit.PROTECTED
    assert torch.equal(model.model.embed_tokens.weight[:, prot], fresh.model.embed_tokens.weight[:, prot])
    assert torch.equal(model.lm_head.weight[:, _circuit.OUT], fresh.lm_head.weight[:, _circuit.OUT])
    # ...while the rest of the network did learn
    assert not torch.equal(
        model.model.layers[3].mlp.down_proj.weight, fresh.model.layers[3].mlp.down_proj.weight
    )


def test_generate_answers_from_a_document(loaded):
    model, tok = loaded
    org = synthetic_org(seed=11)
    hits = 0
    facts = org.facts[::9][:12]
    for f in facts:
        enc = tok(org.in_context_prompt(f), return_tensors="pt")
        out = model.generate(
            **enc, max_new_tokens=len(f.answer.encode()), do_sample=False, pad_token_id=tok.pad_token_id
        )
        hits += tok.decode(out[0, enc["input_ids"].shape[1] :]) == f.answer
    assert hits >= len(facts) // 2


def test_same_seed_builds_identical_weights(tmp_path):
    a = build_tiny_base(tmp_path / "a", seed=5, progress=False, steps=3)
    b = build_tiny_base(tmp_path / "b", seed=5, progress=False, steps=3)
    c = build_tiny_base(tmp_path / "c", seed=6, progress=False, steps=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert base_fingerprint(a) == base_fingerprint(b) == base_meta(a)["fingerprint"]
    assert base_fingerprint(c) != base_fingerprint(a)


def test_fingerprint_of_a_foreign_model_is_cached_and_tracks_weights(tmp_path):
    path = _foreign_llama(tmp_path / "foreign")
    fp = base_fingerprint(path)
    assert json.loads((path / "fleet_base.json").read_text())["fingerprint"] == fp
    assert base_fingerprint(path) == fp
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(path)
    assert base_fingerprint(path) != fp


def _foreign_llama(path: Path) -> Path:
    """A Llama-family model fleet did not build: GQA, tied embeddings, no pad token."""
    cfg = LlamaConfig(
        vocab_size=264,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok = build_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(path)
    return path


def test_load_base_reads_any_local_llama(tmp_path):
    path = _foreign_llama(tmp_path / "other")
    model, tok = load_base(path)
    assert model.config.num_key_value_heads == 2
    assert tok.pad_token_id == tok.eos_token_id
    with torch.no_grad():
        logits = model(**tok(["hello", "a longer line"], return_tensors="pt", padding=True)).logits
    assert logits.shape[:2] == (2, len("a longer line") + 1)


def test_ensure_base_errors_name_the_bad_path(tmp_path):
    missing = tmp_path / "nowhere"
    cfg = FleetConfig(data_dir=str(tmp_path / "data"), base={"path": str(missing)})
    with pytest.raises(ConfigError, match="nowhere"):
        ensure_base(cfg, progress=False)
    not_a_model = tmp_path / "junk"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"]})
    )
    cfg = FleetConfig(data_dir=str(tmp_path / "data"), base={"path": str(not_a_model)})
    with pytest.raises(ConfigError, match="junk"):
        ensure_base(cfg, progress=False)
    with pytest.raises(ConfigError, match="junk"):
        load_base(not_a_model)


def test_ensure_base_uses_or_builds_the_default_location(tmp_path, base_dir, monkeypatch):
    data = tmp_path / "data"
    cfg = FleetConfig(data_dir=str(data))
    # an existing default base is used as is
    shutil.copytree(base_dir, data / "base")
    assert ensure_base(cfg, progress=False) == data / "base"
    # a missing one is built there (shortened pre-training: the build itself is real)
    shutil.rmtree(data / "base")
    monkeypatch.setattr(build_mod, "PretrainSpec", functools.partial(PretrainSpec, steps=2))
    built = ensure_base(cfg, progress=False)
    assert built == data / "base" and base_meta(built)["steps"] == 2
    load_base(built)
    # junk at the default location is reported, not overwritten
    shutil.rmtree(built)
    (data / "base").mkdir()
    with pytest.raises(ConfigError, match="fleet base build"):
        ensure_base(cfg, progress=False)


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build_mod, "save_quietly", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_base(tmp_path / "b", progress=False, steps=1)
    assert list(tmp_path.iterdir()) == []


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ConfigError, match="float8"):
        resolve_dtype("float8", "cpu")
    with pytest.raises(ConfigError):
        resolve_device("tpu:9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no GPU"):
            resolve_device("cuda")


def test_build_never_replaces_what_fleet_did_not_write(tmp_path, base_dir):
    from fleet.cli import main

    checkpoint = tmp_path / "llama-3"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights someone needs")
    with pytest.raises(ConfigError, match="not a base fleet wrote"):
        build_tiny_base(checkpoint, progress=False, steps=1)
    assert (checkpoint / "model.safetensors").read_bytes() == b"weights someone needs"
    # The CLI says so in one line with exit code 2, also when base.path points there.
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nbase:\n  path: {checkpoint}\n")
    assert main(["--config", str(cfg), "base", "build"]) == 2
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors"]
    # A fleet base is replaced only with --force; an empty directory is simply used.
    fleet_base = tmp_path / "tiny"
    shutil.copytree(base_dir, fleet_base)
    with pytest.raises(ConfigError, match="--force"):
        build_tiny_base(fleet_base, progress=False, steps=1)
    assert base_meta(fleet_base)["steps"] != 1
    build_tiny_base(fleet_base, progress=False, steps=1, force=True)
    assert base_meta(fleet_base)["steps"] == 1
    (tmp_path / "empty").mkdir()
    assert is_causal_lm_dir(build_tiny_base(tmp_path / "empty", progress=False, steps=1))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        build_tiny_base(tmp_path / "file", progress=False, steps=1)


def test_base_name_comes_from_the_base_record_unless_set(tmp_path, base_dir):
    from fleet.config import load_config

    imported = tmp_path / "bases" / "some-model"
    shutil.copytree(base_dir, imported)
    meta = json.loads((imported / "fleet_base.json").read_text())
    meta["name"] = "some-model-instruct"
    (imported / "fleet_base.json").write_text(json.dumps(meta))
    cfg_file = tmp_path / "fleet.yaml"
    cfg_file.write_text(f"base:\n  path: {imported}\n")
    assert load_config(cfg_file, env={}).base.name == "some-model-instruct"
    cfg_file.write_text(f"base:\n  path: {imported}\n  name: pinned\n")
    assert load_config(cfg_file, env={}).base.name == "pinned"
    (imported / "fleet_base.json").unlink()
    cfg_file.write_text(f"base:\n  path: {imported}\n")
    assert load_config(cfg_file, env={}).base.name == "fleet-tiny-llama"  # no record: the default
    assert load_config(None, env={}).base.name == "fleet-tiny-llama"
