"""Small Qwen-style tokenizers trained on a corpus, saved as standard HF tokenizer files.

Used by the demo (which cannot download Qwen's tokenizer) and by tests. Like Qwen's, it
is a byte-level BPE (spaces merge into the following word, no BOS is added) with
`<|endoftext|>` as padding and `<|im_end|>` as the end-of-turn / EOS token, so the
templates and the stop rule behave exactly as with the real tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD = "<|endoftext|>"
END_OF_TURN = "<|im_end|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, out_dir: str | Path | None = None):
    """Train a byte-level BPE on `texts`; returns a `PreTrainedTokenizerFast` (saved if `out_dir`)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, END_OF_TURN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=END_OF_TURN)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
