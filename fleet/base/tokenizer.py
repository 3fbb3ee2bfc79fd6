"""The base's tokenizer, loaded one way for every part of fleet (``load_tokenizer``: local
files, a pad token, a chat template; ``stop_token_ids``, ``chat_ids``, ``chat_text``), and the
tiny base's byte-level tokenizer (``build_tokenizer``).

The tiny one:
One token per byte (ids 0–255 are the byte values), then a few special tokens. No
merges: any UTF-8 text round-trips exactly, nothing has to be learned or downloaded,
and a token count is a byte count, which keeps the accounting of fleet's data simple.
It is a ``tokenizers`` Tokenizer wrapped as a ``PreTrainedTokenizerFast``, so
``AutoTokenizer.from_pretrained`` loads it like any Hugging Face tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fleet.errors import ConfigError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
# Two reserved ids round the vocabulary up to 264 (a multiple of 8, kinder to GPU
# matmuls) while keeping len(tokenizer) == the model's vocab_size.
RESERVED = ("<|reserved_0|>", "<|reserved_1|>")
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, USER, ASSISTANT, SYSTEM, *RESERVED)
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# A turn is "<|role|>\n<content><|eos|>\n"; a generation prompt ends with
# "<|assistant|>\n", and the model ends its answer with <|eos|>. The template starts
# with <|bos|> because apply_chat_template tokenizes without adding special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _byte_vocab() -> dict[str, int]:
    # ByteLevel's printable stand-ins for the 256 bytes, numbered by byte value.
    table = pre_tokenizers.ByteLevel.alphabet()
    mapping = _bytes_to_unicode()
    vocab = {mapping[b]: b for b in range(256)}
    assert set(vocab) == set(table), "byte alphabet mismatch"
    return vocab


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (what ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level tokenizer with fleet's special tokens and chat template."""
    tok = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[], dropout=None, fuse_unk=False))
    # No regex split: with no merges, words do not matter and one pass is faster.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = tok.token_to_id(BOS)
    # Every encoded text starts with <|bos|>, as Llama tokenizers do: the base always
    # saw it first in pre-training, and it gives attention a fixed place to rest.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM, *RESERVED],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        padding_side="left",  # generation pads on the left so every row ends at its prompt
    )
    assert len(fast) == VOCAB_SIZE, (len(fast), VOCAB_SIZE)
    return fast


# ---------------------------------------------------------------- any base's tokenizer
@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-load progress bars or info logs (they would flood workers' logs)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


# Used when a base's tokenizer has no chat template of its own: one line per turn, then the
# assistant's cue. fleet's tiny base ships its own template (fleet.base.tokenizer.CHAT_TEMPLATE).
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The base's tokenizer as every part of fleet uses it: local files only, a pad token (its eos
    when it has none, as generation expects), a chat template (``SIMPLE_CHAT_TEMPLATE`` when the
    base has none). ``stop_token_ids(tokenizer)`` gives every token that ends a turn."""
    p = Path(path).expanduser()
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"could not load the base's tokenizer at {p}: {exc}") from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokenizer's eos and the base's generation-config eos ids (Llama 3 ends a turn with
    ``<|eot_id|>``, SmolLM2 and Qwen2 with ``<|im_end|>``): generation stops on any of them.
    The generation config is read from the directory the tokenizer was loaded from."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    source = str(getattr(tokenizer, "name_or_path", "") or "")
    gen_file = Path(source) / "generation_config.json"
    if source and gen_file.is_file():
        import json

        try:
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except ValueError:
            eos = None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(t) for t in eos if isinstance(t, int))
    return tuple(sorted(ids))


def chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation through the base tokenizer's own chat template (with the
    assistant's cue appended when ``add_generation_prompt``): how every part of fleet asks a chat."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(t) for t in ids]


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """A finished conversation rendered by the base's chat template, as text."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
