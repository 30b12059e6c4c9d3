"""Small Qwen-style tokenizers trained on a corpus, saved as standard HF tokenizer files.

Used by the demo (which cannot download Qwen's tokenizer) and by tests. Like Qwen's, it
is a byte-level BPE (no BOS is added) with `<|endoftext|>` as padding and `<|im_end|>` as
the end-of-turn / EOS token, so the templates and the stop rule behave as with the real
tokenizer.

Where spaces go is a choice. Qwen merges a space into the *following* word, so the
inference prompt's trailing `"ASSISTANT: "` ends in a lone space token that training
never shows before an answer (there the space belongs to the answer's first token).
A pretrained Qwen copes with that; a model trained from scratch on such a tokenizer
answers every question with the same few tokens. `space_joins="previous"` attaches spaces
to the end of the word before them instead, so `"ASSISTANT: "` is tokenised the same
in training and at inference; the demo uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD = "<|endoftext|>"
END_OF_TURN = "<|im_end|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, out_dir: str | Path | None = None,
                    space_joins: str = "next"):
    """Train a byte-level BPE on `texts`; returns a `PreTrainedTokenizerFast` (saved if `out_dir`).

    `space_joins`: "next" (Qwen: `" word"`) or "previous" (`"word "`; see the module docstring).
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if space_joins == "next":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif space_joins == "previous":  # words with their trailing whitespace; leading whitespace alone
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\S+\s*"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ValueError(f"space_joins must be 'next' or 'previous', got {space_joins!r}")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, END_OF_TURN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=END_OF_TURN)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
