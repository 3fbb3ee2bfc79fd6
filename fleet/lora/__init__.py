"""fleet.lora: the multi-adapter LoRA engine.

Many LoRA adapters live in one base model at once (slot pools in every adapted ``nn.Linear``),
and every row of a batch can use its own stack of up to three of them (company, team,
individual). Training, serving and divergence scoring all run through this API::

    engine = LoraEngine(model, target_modules=DEFAULT_TARGET_MODULES, max_slots=64, max_rank=16)
    s = engine.load("acme/search@v3", AdapterWeights.from_peft_dir(path))
    with engine.rows(torch.tensor([[c, t, s], [c, -1, -1]])):   # [B, L] slots, -1 = none
        logits = engine.model(input_ids).logits                    # row b uses its own stack

    outs = generate(engine, tokenizer, ["Hello"], [[c, t, s]], max_new_tokens=32)

Contract (stable):

- ``AdapterWeights``: one LoRA in PEFT's format (``rank``, ``alpha``, ``use_rslora``,
  ``target_modules``, ``tensors`` in PEFT names, optional ``base_model_name_or_path``);
  ``scale``; ``from_peft_dir``/``to_peft_dir``; ``from_bytes``/``to_bytes`` (the two files of
  PEFT's directory); ``fresh(model, rank=, alpha=, target_modules=, use_rslora=, seed=)``;
  ``stack(levels)`` (one LoRA of rank Σrᵢ equal to the sum); ``modules()``. Refuses what the
  engine does not compute with ``UnsupportedAdapterError``.
- ``LoraEngine(model, *, target_modules, max_slots, max_rank, dtype=None)``: ``model``,
  ``load(key, weights, *, trainable=False) -> slot``, ``unload(key)``, ``slot(key)``,
  ``keys()``, ``free_slots``, ``capacity``, ``set_trainable(key, flag)``, ``is_trainable(key)``,
  ``rank(key)``, ``adapted_modules(key)``, ``export(key)``, ``check(weights)`` (raise what
  ``load`` would, load nothing), ``rows(slots_BL)`` (context), ``plan(slots_BL)`` (a reusable,
  validated row plan ``rows()`` also accepts); attributes ``max_rank``, ``target_modules``,
  ``dtype``, ``device``, ``layers`` (module path → wrapped layer with ``d_in``, ``d_out``,
  ``max_rank``, ``At_SDR``, ``Bt_SRO``), ``version`` (bumped by every load/unload/trainability
  change).
  Errors: ``CapacityError`` (no free slot, rank > max_rank), ``NotFoundError`` (unknown key),
  ``UnsupportedAdapterError`` (adapter does not fit this base), ``ValidationError`` (bad slots).
- ``SlotAdamW(engine, keys, *, betas, eps, weight_decay)``: ``set_lr``, ``grad_norms``,
  ``clip_``, ``step(keys=None)``, ``zero_grad``, ``state_dict``, ``load_state_dict``.
- ``generate(engine, tokenizer, prompts, slots_BL, *, max_new_tokens, temperature=0.0,
  top_p=1.0, stop=None, seed=None, eos_token_id=None) -> list[Generation]``.
- ``prompt_logprobs(engine, prompts, slots_BL, *, top_k) -> list[list[dict]]``.
- ``lay_out_for_cpu(model) -> dict``: a CPU model's weights laid out for decoding (column-major
  projections, an MKL-packed tied LM head), values unchanged; serving replicas call it, training
  does not. Returns ``{"column_major": n, "packed_head": bool}``.
- ``DecodeBatch(engine, tokenizer=None, *, eos_token_id=None)``: ``add(request_id, prompt_ids,
  slots_L, max_new_tokens, temperature=0.0, top_p=1.0, stop=None, seed=None)``, ``add_many``,
  ``step() -> list[StepOutput]`` (``request_id, token_id, finished, finish_reason``),
  ``cancel(request_id)``, ``active``, ``results`` (request id → ``Generation``).

Notes for callers:

- Import these names from ``fleet.lora``; the generation code lives in ``fleet.lora.generation``
  (a module named ``generate`` would shadow the function).
- Slots in ``slots_BL`` are the numbers ``load`` returned. Pools are per wrapped layer
  (``engine.layers[name]``): ``At_SDR [S+1, d_in, R]`` and ``Bt_SRO [S+1, R, d_out]``, i.e. A and
  B transposed relative to PEFT, at pool index ``slot + 1`` (index 0 is the zero adapter). Use
  ``export``/``adapted_modules``/``rank`` rather than reading pools where you can.
- Generation (``generate``, ``DecodeBatch``, ``prompt_logprobs``) runs its own decode path and
  supports Llama-architecture bases; the engine's forward works for any model with ``nn.Linear``
  projections. A completion's ``token_ids`` excludes a final EOS; ``text`` excludes a stop string.
"""

from __future__ import annotations

from fleet._lazy import lazy_exports

# Names resolve lazily (fleet._lazy): `fleet --help` and the serving ingress
# must not pay for importing torch and transformers.
_EXPORTS = {
    "DEFAULT_TARGET_MODULES": "fleet.lora.adapter",
    "AdapterWeights": "fleet.lora.adapter",
    "LoraEngine": "fleet.lora.engine",
    "SlotAdamW": "fleet.lora.optim",
    "DecodeBatch": "fleet.lora.generation",
    "Generation": "fleet.lora.generation",
    "StepOutput": "fleet.lora.generation",
    "generate": "fleet.lora.generation",
    "prompt_logprobs": "fleet.lora.generation",
    "import_peft": "fleet.lora.interop",
    "export_peft": "fleet.lora.interop",
    "generate_for": "fleet.lora.interop",
    "build_engine": "fleet.lora.build",
    "lay_out_for_cpu": "fleet.lora.layout",
    "StackSlots": "fleet.lora.build",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
