"""A byte-level BPE tokenizer trained on the corpus, saved as a Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, MASK_TOKEN)  # ids 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Train byte-level BPE; special tokens take ids 0 (EOS), 1 (PAD), 2 (MASK, for block drafters).

    Returns a ``transformers.PreTrainedTokenizerFast`` (save it with ``save_pretrained``; it loads
    back with ``AutoTokenizer.from_pretrained``). Every string round-trips: the byte alphabet is
    always in the vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not 512 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in [512, 65536], got {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   mask_token=MASK_TOKEN, clean_up_tokenization_spaces=False)
