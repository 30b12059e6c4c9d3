"""Letter extraction by an LLM judge, as MuCUE-Bench scores free-text answers.

MuCUE-Bench (the benchmark's reference scripts, `scripts/extract_single.py`) asks Qwen3-8B,
served without thinking, temperature 0.1, at most 32 new tokens, one user message:

    JUDGE_PROMPT.format(choices_text, answer)

and counts an item correct when the reply *is* the correct letter. Here the judge is any Qwen3
checkpoint (a Hugging Face folder or a jaxmusic checkpoint; a whole MuFun's LLM works too) run
by jaxmusic's own Qwen3 and `jaxmusic.generate`. The message is laid out as Qwen3's chat template
does for one user turn with thinking off (`judge_text`). Its reply counts as a letter when,
stripped of white space (and of an empty `<think></think>` block, should the judge write one),
it is one of the item's letters; anything else ("None", a sentence) is unparsed.

Sampling at temperature > 0 is seeded per item (`seed` + a digest of the item's key), each item
in a call of its own, so that a reply never depends on which items shared a batch: a resumed or
differently sharded run draws exactly the replies an uninterrupted one would. Temperature 0 is
greedy and batched.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np

from jaxmusic.errors import UserError

JUDGE_PROMPT = ("\nextract the choice of A, B, C, D from the following answer.\n"
                "If the answer is not clear, return \"None\", otherwise just return the single choice letter.\n"
                "options: {}\n answer: \n{}\n\n")
JUDGE_TEMPERATURE = 0.1
JUDGE_MAX_NEW_TOKENS = 32
_THINK = re.compile(r"^\s*<think>.*?</think>", re.S)


def judge_text(choices_text: str, answer: str) -> str:
    """The judge's whole input: Qwen3's chat layout of one user message, thinking off."""
    message = JUDGE_PROMPT.format(choices_text, answer)
    return f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def read_letter(reply: str, n_options: int) -> int | None:
    """The option index the judge's reply names, or None (MuCUE-Bench: reply == letter)."""
    letter = _THINK.sub("", reply).strip()
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_options]
    return letters.index(letter) if len(letter) == 1 and letter in letters else None


def item_seed(seed: int, key: str) -> int:
    """A sampling seed that depends only on the run's seed and the item."""
    return (seed + int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)) % 2**31


class Judge:
    """A Qwen3 LM and its tokenizer, loaded once for a run."""

    def __init__(self, path: str, *, dtype: str = "float32", temperature: float = JUDGE_TEMPERATURE,
                 seed: int = 0, max_new_tokens: int = JUDGE_MAX_NEW_TOKENS):
        from flax import nnx
        from transformers import AutoTokenizer

        from jaxmusic import checkpoints, inference
        from jaxmusic.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
        from jaxmusic.nn import ModelOptions

        if temperature < 0:
            raise UserError(f"--judge-temperature must be >= 0, got {temperature}")
        ckpt = inference.resolve_checkpoint(path)
        llm = checkpoints.read_meta(ckpt).get("parts", {}).get("llm")
        if llm is None or "tokenizer" not in llm:
            raise UserError(f"{path}: the judge needs a Qwen3 LLM and its tokenizer; this checkpoint has none")
        cfg = Qwen3Config.from_hf(llm["hf_config"])
        opts = ModelOptions.from_names(param_dtype=dtype, dtype=dtype)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, opts, nnx.Rngs(0))))
        nnx.replace_by_pure_dict(state, checkpoints.load_params(ckpt, "llm", state))
        self.model = nnx.merge(graphdef, state)
        self.split = nnx.split(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt / llm["tokenizer"])
        marks = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
        if any(m is None or m == self.tokenizer.unk_token_id for m in marks):
            raise UserError(f"{path}: the judge's tokenizer lacks Qwen's <|im_start|>/<|im_end|> tokens")
        self.stop_ids = tuple(sorted({marks[1]} | ({self.tokenizer.eos_token_id} - {None})))
        self.temperature, self.seed, self.max_new_tokens = temperature, seed, max_new_tokens

    def _generate(self, prompts: Sequence[list[int]], batch_size: int, seed: int) -> list[str]:
        from jaxmusic.generate import generate

        rows = list(prompts) + [prompts[0]] * (batch_size - len(prompts))  # one compiled batch size
        ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
        for r, p in enumerate(rows):
            ids[r, :len(p)] = p
        out = generate(self.split, self.model.embed(ids), [len(p) for p in rows],
                       max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed,
                       stop_ids=self.stop_ids)
        return [self.tokenizer.decode([t for t in row if t not in self.stop_ids], skip_special_tokens=True)
                for row in out[:len(prompts)]]

    def replies(self, keys: Sequence[str], choices_texts: Sequence[str], answers: Sequence[str],
                batch_size: int) -> list[str]:
        """The judge's reply for every (item key, choices_text, model answer)."""
        prompts = [self.tokenizer(judge_text(c, a), add_special_tokens=False)["input_ids"]
                   for c, a in zip(choices_texts, answers)]
        if self.temperature == 0:
            return self._generate(prompts, batch_size, self.seed)
        return [self._generate([p], 1, item_seed(self.seed, k))[0] for k, p in zip(keys, prompts)]
