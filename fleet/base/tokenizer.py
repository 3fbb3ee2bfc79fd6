"""The tiny base's byte-level tokenizer.

One token per byte (ids 0–255 are the byte values), then a few special tokens. No
merges: any UTF-8 text round-trips exactly, nothing has to be learned or downloaded,
and a token count is a byte count, which keeps the accounting of fleet's data simple.
It is a ``tokenizers`` Tokenizer wrapped as a ``PreTrainedTokenizerFast``, so
``AutoTokenizer.from_pretrained`` loads it like any Hugging Face tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

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
