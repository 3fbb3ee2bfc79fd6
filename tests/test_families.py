"""The Llama family as Hugging Face defines it: Llama (with RoPE scaling and tied embeddings),
Mistral (sliding window) and Qwen2 (q/k/v biases), each a tiny random model built in-process.

For each: every row of a mixed-adapter batch — through the engine's forward and through fleet's
own KV-cache generation — equals PEFT's output for that row's adapter (a stack exported as one
LoRA) alone. An architecture outside the family is refused by name. A bfloat16 base keeps its
LoRA slots, gradients and optimizer state in float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import one_thread, random_lora
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from fleet.base.loading import SUPPORTED_MODEL_TYPES, check_architecture, context_window
from fleet.errors import ConfigError
from fleet.lora import AdapterWeights, LoraEngine, SlotAdamW, generate

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

VOCAB, NO_EOS = 96, -1
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    intermediate_size=128,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.2,  # clear top-1 margins: greedy paths do not hinge on float noise
)
CONFIGS = {
    "llama": lambda: LlamaConfig(
        **COMMON,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=128, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
}


def build(family: str, dtype: torch.dtype = torch.float32):
    config = CONFIGS[family]()
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(config)
    if family == "qwen2":  # random biases (HF initialises them to zero, which would test nothing)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model.to(dtype).eval()


STACKS = {  # row → (company, team, individual) adapter keys
    0: ("co", "team", "ann"),
    1: (None, None, None),
    2: (None, None, "bob"),
    3: ("co", None, "bob"),
    4: (None, "team", None),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
    name = request.param
    plain = build(name)
    adapters = {
        key: random_lora(plain, rank=r, seed=i, std=0.2)
        for i, (key, r) in enumerate((("co", 8), ("team", 4), ("ann", 8), ("bob", 2)))
    }
    engine = LoraEngine(copy.deepcopy(plain), max_slots=6, max_rank=8)
    for key, w in adapters.items():
        engine.load(key, w)
    return name, plain, adapters, engine, tmp_path_factory.mktemp(f"peft-{name}")


def slots(engine, stack) -> list[int]:
    return [-1 if k is None else engine.slot(k) for k in stack]


def peft_model(plain, adapters, stack, tmp):
    levels = [adapters[k] for k in stack if k is not None]
    if not levels:
        return plain
    one = levels[0] if len(levels) == 1 else AdapterWeights.stack(levels)
    path = tmp / "_".join(k or "x" for k in stack)
    if not path.exists():
        one.to_peft_dir(path)
    return PeftModel.from_pretrained(copy.deepcopy(plain), path).eval()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 3, 1, 12, 6)]


def test_mixed_batch_forward_matches_peft_row_by_row(family) -> None:
    name, plain, adapters, engine, tmp = family
    ids = torch.randint(3, VOCAB, (len(STACKS), 10), generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([slots(engine, STACKS[b]) for b in range(len(STACKS))])
    with torch.no_grad(), engine.rows(rows):
        out = engine.model(input_ids=ids).logits
    base = plain(input_ids=ids).logits.detach()
    for b, stack in STACKS.items():
        with torch.no_grad():
            ref = peft_model(plain, adapters, stack, tmp)(input_ids=ids[b : b + 1]).logits[0]
        assert float((out[b] - ref).abs().max() / ref.abs().max()) <= 1e-5, (name, stack)
        if any(stack):  # the comparison can fail: an adapter moves the logits far more than that
            assert float((ref - base[b]).abs().max() / base[b].abs().max()) > 1e-2


def test_mixed_batch_generation_matches_peft_greedy_row_by_row(family) -> None:
    name, plain, adapters, engine, tmp = family
    rows = [slots(engine, STACKS[b]) for b in range(len(STACKS))]
    outs = generate(engine, None, prompts(), rows, max_new_tokens=10, eos_token_id=NO_EOS)
    for b, (prompt, out) in enumerate(zip(prompts(), outs, strict=True)):
        model = peft_model(plain, adapters, STACKS[b], tmp)
        with torch.no_grad():
            ref = model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert out.token_ids == ref, (name, STACKS[b])
    assert len({tuple(o.token_ids) for o in outs}) > 1  # different stacks, different completions


def test_context_window_caps_sliding_attention() -> None:
    assert context_window(CONFIGS["mistral"]()) == 128  # the window, not the 256 positions
    assert context_window(CONFIGS["qwen2"]()) == 256  # no sliding window unless use_sliding_window
    assert context_window(CONFIGS["llama"]()) == 256


def test_unsupported_architecture_is_refused_by_name() -> None:
    opt = OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
        word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        check_architecture(opt, where="the base at /models/opt")
    message = str(info.value)
    assert "'opt'" in message and all(t in message for t in SUPPORTED_MODEL_TYPES)
    engine = LoraEngine(
        AutoModelForCausalLM.from_config(opt), target_modules=["q_proj"], max_slots=1, max_rank=2
    )
    with pytest.raises(ConfigError, match="'opt'"):
        generate(engine, None, [[3, 4]], [[-1, -1, -1]], max_new_tokens=2)


def test_bfloat16_base_trains_float32_slots_gradients_and_optimizer_state() -> None:
    model = build("llama", dtype=torch.bfloat16)
    engine = LoraEngine(model, max_slots=2, max_rank=4)
    fresh = AdapterWeights.fresh(model, rank=4, alpha=8.0, seed=0)
    engine.load("ann", fresh, trainable=True)
    layers = list(engine.layers.values())
    assert all(layer.At_SDR.dtype == torch.float32 for layer in layers)
    assert all(layer.base_layer.weight.dtype == torch.bfloat16 for layer in layers)
    opt = SlotAdamW(engine, ["ann"])
    opt.set_lr({"ann": 1e-2})
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    with engine.rows(torch.tensor([[-1, -1, engine.slot("ann")]] * 2)):
        logits = model(input_ids=ids).logits
        assert logits.dtype == torch.bfloat16
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:])
        loss.backward()
    grads = [layer.Bt_SRO.grad for layer in layers]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)
    opt.step(["ann"])
    member = opt.state_dict()["members"]["ann"]
    tensors = [*member["exp_avg"].values(), *member["exp_avg_sq"].values()]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    trained = engine.export("ann")
    moved = max(float((trained.tensors[k] - fresh.tensors[k]).abs().max()) for k in fresh.tensors)
    assert moved > 0  # a float32 update survives (bfloat16 slots would round small steps away)
