"""Prompt templates: conversation -> token pieces with loss masks; the MuCUE prompt.

MuFun's two templates, strings exactly as in the reference (TinyLLaVA-Factory fork):

* `pretrain` (alignment stage): per turn `"<audio>" + answer + "\\n"`; the question is
  dropped and every token except the audio placeholder carries loss.
* `qwen2_instruct` (all later stages, inference): `SYSTEM`, then per turn
  `"USER: " + question + " " + "ASSISTANT: " + answer + "<|im_end|>"`; loss on
  `answer + "<|im_end|>"` of every turn.

Qwen2-Audio's template, `chatml` (the chat template of Qwen2-Audio-7B-Instruct, as its
processor renders it): `"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"`, then
per turn `"<|im_start|>user\n" + question + "<|im_end|>\n<|im_start|>assistant\n"` and
`answer + "<|im_end|>"` (loss) + `"\n"`. The k-th `<audio>` tag of the conversation renders
as `"Audio k: <|audio_bos|><audio><|audio_eos|>"`: the audio tokens take the place of the
processor's `<|AUDIO|>`, which it expands to one token per pooled encoder frame. MuFun-format
data (`"<audio>\n" + question`) thus renders exactly as Qwen2-Audio's chat template.

The rendered text is split at every `<audio>` tag and each piece is tokenised on its own,
with no special tokens added, so no token straddles an audio position. The result is a
`TokenizedText`: `n_audio + 1` id arrays and matching boolean loss masks, which
`jaxmusic.models.splice_plan.build_splice_plan` turns into model inputs.

Which tokens carry loss: a token is a target when any character it covers belongs to a
labelled span (answer, `<|im_end|>`). With Qwen's byte-level tokenizer the space after
`"ASSISTANT:"` merges into the answer's first token (`" blues"`), so that token is a
target. This is exactly what the reference's label code produces for Qwen (its
`instruction_len - 1` drops the lone trailing-space token of the tokenised prompt). The
two differ only for answers that themselves start with whitespace: the reference then
also puts loss on the separating space token, we do not.

The MuCUE benchmark's prompt (`mucue_prompt`) is a question text for `qwen2_instruct`:
`"Choose the correct option for the question based on the audio. " + question + " " + choices`.

This module needs only NumPy and a tokenizer (no JAX), so data workers can import it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

AUDIO_PLACEHOLDER = "<audio>"
END_OF_TURN = "<|im_end|>"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions. ")
TEMPLATES = ("pretrain", "qwen2_instruct", "chatml")
INFERENCE_TEMPLATES = ("qwen2_instruct", "chatml")  # those with a prompt/answer form (ask, score, eval)
CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
CHATML_USER = "<|im_start|>user\n"
CHATML_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
MUCUE_INSTRUCTION = "Choose the correct option for the question based on the audio. "
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TemplateError(ValueError):
    """A sample that cannot be rendered (bad roles, tag/file mismatch, ...).

    The data pipeline catches these, counts them and skips the sample.
    """


@dataclasses.dataclass(frozen=True)
class TokenizedText:
    """Token ids of the text between audio placeholders, with per-token loss masks.

    `pieces[i]` is the text before audio `i` (the last piece follows the last audio),
    so `len(pieces) == n_audio + 1`; a piece may be empty.
    """

    pieces: tuple[np.ndarray, ...]       # int32 [n_i]
    loss_masks: tuple[np.ndarray, ...]   # bool [n_i], True where the token is a target

    @property
    def n_audio(self) -> int:
        return len(self.pieces) - 1


# ---------------------------------------------------------------------------- conversations

def split_turns(conversations, n_audio: int, *, placeholder: str = AUDIO_PLACEHOLDER
                ) -> list[tuple[str, str]]:
    """Validate a MuFun conversation list and return its (question, answer) turns.

    Roles must alternate human, gpt, human, gpt, ...; `placeholder` may appear only in
    questions, and exactly `n_audio` times in total.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise TemplateError("conversations must be a non-empty list of {from, value} messages")
    for i, msg in enumerate(conversations):
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
            raise TemplateError(f"message {i} must be a dict with a string 'value', got {msg!r}")
        expected = "human" if i % 2 == 0 else "gpt"
        if msg.get("from") != expected:
            raise TemplateError(f"message {i} is from {msg.get('from')!r}, expected {expected!r} "
                                "(roles must alternate human, gpt, ... starting with human)")
        if expected == "gpt" and placeholder in msg["value"]:
            raise TemplateError(f"message {i} (an answer) contains {placeholder!r}")
    if len(conversations) % 2:
        raise TemplateError("the last message must be from 'gpt' (every question needs an answer)")
    turns = [(conversations[i]["value"], conversations[i + 1]["value"])
             for i in range(0, len(conversations), 2)]
    n_tags = sum(q.count(placeholder) for q, _ in turns)
    if n_tags != n_audio:
        raise TemplateError(f"{n_tags} {placeholder!r} tags in the questions but {n_audio} audio files")
    return turns


def render(template: str, turns: Sequence[tuple[str, str]], *, placeholder: str = AUDIO_PLACEHOLDER
           ) -> list[tuple[str, bool]]:
    """The template's text as (segment, carries_loss) pairs, in order."""
    if template == "pretrain":
        segments = []
        for _, answer in turns:  # the reference drops the question and keeps one tag per turn
            segments += [(placeholder, False), (answer + "\n", True)]
        return segments
    if template == "qwen2_instruct":
        segments = [(SYSTEM, False)]
        for question, answer in turns:
            segments += [("USER: " + question + " " + "ASSISTANT: ", False),
                         (answer + END_OF_TURN, True)]
        return segments
    if template == "chatml":
        segments, n_audio = [(CHATML_SYSTEM, False)], 0
        for question, answer in turns:
            question, n_audio = _chatml_audio(question, n_audio, placeholder)
            segments += [(CHATML_USER + question + CHATML_ASSISTANT, False), (answer + END_OF_TURN, True),
                         ("\n", False)]
        return segments
    raise TemplateError(f"unknown template {template!r}; expected one of {TEMPLATES}")


def _chatml_audio(question: str, first: int, placeholder: str) -> tuple[str, int]:
    """Each tag as `"Audio k: <|audio_bos|>" + tag + "<|audio_eos|>"`, k counting from `first + 1`
    over the conversation; returns the question and the count so far."""
    pieces = question.split(placeholder)
    out = pieces[0]
    for k, piece in enumerate(pieces[1:], first + 1):
        out += f"Audio {k}: <|audio_bos|>{placeholder}<|audio_eos|>" + piece
    return out, first + len(pieces) - 1


# ------------------------------------------------------------------------------ tokenising

def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("a fast (Rust `tokenizers`) tokenizer is required: labels use its offset mapping")
    ids = tokenizer(END_OF_TURN, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer must know {END_OF_TURN!r} as one special token, got ids {ids}")


def tokenize_segments(segments: Sequence[tuple[str, bool]], tokenizer, *,
                      placeholder: str = AUDIO_PLACEHOLDER) -> TokenizedText:
    """Split rendered text at each placeholder and tokenise every piece on its own."""
    _check_tokenizer(tokenizer)
    text = "".join(s for s, _ in segments)
    char_loss = np.concatenate([np.full(len(s), flag) for s, flag in segments] + [np.zeros(0, bool)])
    pieces, masks, start = [], [], 0
    for piece in text.split(placeholder):
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        piece_loss = char_loss[start:start + len(piece)]
        # a zero-width span (possible with trimmed offsets) counts by the character it sits on
        mask = np.array([piece_loss[a:max(b, a + 1)].any() for a, b in enc["offset_mapping"]],
                        dtype=bool)
        pieces.append(np.asarray(enc["input_ids"], dtype=np.int32))
        masks.append(mask)
        start += len(piece) + len(placeholder)
    return TokenizedText(tuple(pieces), tuple(masks))


def encode_conversation(template: str, conversations, n_audio: int, tokenizer, *,
                        placeholder: str = AUDIO_PLACEHOLDER) -> TokenizedText:
    """A training sample: the reference's text for `template` with loss on the answers."""
    turns = split_turns(conversations, n_audio, placeholder=placeholder)
    if template == "pretrain" and len(turns) != n_audio:
        # one placeholder per turn replaces the questions' tags; each needs its own audio file
        raise TemplateError(f"pretrain renders one {placeholder!r} per turn: {len(turns)} turns "
                            f"but {n_audio} audio files")
    return tokenize_segments(render(template, turns, placeholder=placeholder), tokenizer,
                             placeholder=placeholder)


def encode_rl_prompt(template: str, conversations, n_audio: int, tokenizer, *,
                     placeholder: str = AUDIO_PLACEHOLDER) -> tuple[TokenizedText, str, str]:
    """A reinforcement-learning prompt from a training sample: `(tokens, prompt text, ground truth)`.

    The prompt is the `qwen2_instruct` rendering of the conversation up to and including the
    last `"ASSISTANT: "` (earlier turns keep their answers), as MuFun's GRPO data renders it;
    the ground truth is the last answer's text. No token carries loss.
    """
    if template != "qwen2_instruct":
        raise TemplateError(f"reinforcement learning prompts use the qwen2_instruct template, not {template!r}")
    turns = split_turns(conversations, n_audio, placeholder=placeholder)
    segments = render(template, turns[:-1], placeholder=placeholder) + [
        ("USER: " + turns[-1][0] + " " + "ASSISTANT: ", False)]
    text = tokenize_segments([(s, False) for s, _ in segments], tokenizer, placeholder=placeholder)
    return text, "".join(s for s, _ in segments), turns[-1][1]


def stop_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end an answer: `<|im_end|>` and the tokenizer's EOS."""
    stop = [tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id]
    return tuple(sorted({int(s) for s in stop if s is not None and s != tokenizer.unk_token_id}))


# ------------------------------------------------------------------------------- inference

def inference_prompt(question: str, n_audio: int, *, placeholder: str = AUDIO_PLACEHOLDER,
                     template: str = "qwen2_instruct") -> str:
    """The `qwen2_instruct` prompt for one question, ending in `"ASSISTANT: "` (trailing space),
    or with `template="chatml"` Qwen2-Audio's, ending in `"<|im_start|>assistant\n"`.

    A question without tags gets one `placeholder + "\\n"` per audio file in front: the
    layout of MuFun's training data (`"<audio>\\n" + question`; the README's chat examples
    write `"\\n<audio>" + question` instead, which we do not copy since training never saw
    it). A question with tags must have exactly one per audio file, and keeps them in place.
    """
    n_tags = question.count(placeholder)
    if n_tags == 0:
        question = (placeholder + "\n") * n_audio + question
    elif n_tags != n_audio:
        raise TemplateError(f"{n_tags} {placeholder!r} tags in the question but {n_audio} audio files")
    if template == "chatml":
        return CHATML_SYSTEM + CHATML_USER + _chatml_audio(question, 0, placeholder)[0] + CHATML_ASSISTANT
    if template != "qwen2_instruct":
        raise TemplateError(f"template {template!r} has no inference prompt; expected one of {INFERENCE_TEMPLATES}")
    return SYSTEM + "USER: " + question + " " + "ASSISTANT: "


def encode_prompt(question: str, n_audio: int, tokenizer, *, placeholder: str = AUDIO_PLACEHOLDER,
                  template: str = "qwen2_instruct") -> TokenizedText:
    """Tokenised inference prompt (no token carries loss)."""
    prompt = inference_prompt(question, n_audio, placeholder=placeholder, template=template)
    return tokenize_segments([(prompt, False)], tokenizer, placeholder=placeholder)


def encode_scoring(question: str, answer: str, n_audio: int, tokenizer, *,
                   placeholder: str = AUDIO_PLACEHOLDER, template: str = "qwen2_instruct") -> TokenizedText:
    """Prompt + candidate answer + `<|im_end|>`, loss on `answer + "<|im_end|>"` only.

    The whole text is tokenised together, as in training, so the answer's first token
    absorbs the space after `"ASSISTANT:"` exactly as it did when the model learnt it.
    `<|im_end|>` is scored too, so a candidate that is only a prefix of what the model
    would say ("A" vs "A. C major") is not favoured.
    """
    if placeholder in answer:
        raise TemplateError(f"the answer contains {placeholder!r}")
    prompt = inference_prompt(question, n_audio, placeholder=placeholder, template=template)
    return tokenize_segments([(prompt, False), (answer + END_OF_TURN, True)], tokenizer,
                             placeholder=placeholder)


# ------------------------------------------------------------------------------ MuCUE

def choices_text(choices: Sequence[str]) -> str:
    """Lettered options, one per line: `"A. first\nB. second"` (MuCUE's public material does
    not spell its layout out; this is the common "letter, period, text" form)."""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def mucue_prompt(question: str, choices: Sequence[str]) -> str:
    """MuCUE's prompt: fixed instruction, the question, a space, the lettered choices."""
    return MUCUE_INSTRUCTION + question + " " + choices_text(choices)
