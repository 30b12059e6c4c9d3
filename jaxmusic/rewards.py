"""Rewards for reinforcement learning (`loss: grpo`): a registry of named functions, user
functions named `module:function`, and their weighted sum.

A reward function takes the batch's prompts (rendered prompt text), completions (generated
text, special tokens removed), answers (each record's last answer, the ground truth) and
records (the manifest's JSON objects), one entry per completion, and returns one float per
completion:

    fn(prompts, completions, answers, records) -> list[float]

Completions are `Completion`s: strings that also say whether generation ended on a stop
token (`terminated`) rather than at `grpo.max_new_tokens`.

Built in:

* `exact_once` (MuFun's `reward_gt`, train_grpo.py): the ground truth is the answer's text after
  its last `". "` ("B. blues" -> "blues"); 1.0 if that string occurs exactly once in the
  completion (case-sensitive, `str.count`), else 0.
* `choice`: the option the completion picks, read by `jaxmusic eval`'s extractor
  (`jaxmusic.evaluation.evaluate.extract_choice`), against the answer's option. The options are the record's
  `choices`, or the `"A. text"` lines of its last question (the MuCUE prompt's layout); the
  answer is a letter, an option's text, or both ("B. blues"). 0 when the record has no options.
* `format`: 1.0 for a completion with some text that ended on a stop token, else 0.

A stage lists `grpo.rewards: [{name: ..., weight: W}, ...]`; the reward of a completion is the
weighted sum (TRL's `reward_weights`), and each function's mean and spread are logged.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Callable, Sequence

import numpy as np

from jaxmusic import templates
from jaxmusic.configs import ConfigError
from jaxmusic.evaluation.evaluate import extract_choice
from jaxmusic.generate import Completion  # noqa: F401  (what reward functions receive)

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[str], Sequence[dict]], Sequence[float]]


def ground_truth(answer: str) -> str:
    """The part of an answer a completion must state: the text after its last `". "`."""
    return answer.split(". ")[-1]


def exact_once(prompts, completions, answers, records) -> list[float]:
    """1.0 where the ground truth occurs exactly once in the completion (MuFun's reward)."""
    return [float(c.count(ground_truth(a)) == 1) for c, a in zip(completions, answers)]


# "A. text" to the end of its line; the first option follows the question on its line (MuCUE's prompt)
_OPTION_LINE = re.compile(r"(?:^|\s)([A-Z])\.\s+(.+?)\s*$", re.MULTILINE)


def options(record: dict) -> list[str]:
    """A record's answer options: its `choices`, or the lettered lines of its last question."""
    if isinstance(record.get("choices"), list):
        return [str(c) for c in record["choices"]]
    questions = [m.get("value", "") for m in record.get("conversations", []) if m.get("from") == "human"]
    found = _OPTION_LINE.findall(questions[-1]) if questions else []
    letters = "".join(letter for letter, _ in found)
    return [text for _, text in found] if letters == templates.LETTERS[:len(found)] else []


def answer_option(answer: str, choices: Sequence[str]) -> int | None:
    """The option an answer names: a letter, an option's text, or "B. text"."""
    answer = answer.strip()
    if answer in choices:
        return list(choices).index(answer)
    letter = answer.split(".")[0].strip()
    if len(letter) == 1 and letter in templates.LETTERS[:len(choices)]:
        return templates.LETTERS.index(letter)
    return None


def choice(prompts, completions, answers, records) -> list[float]:
    """1.0 where the option read from the completion is the answer's option."""
    out = []
    for c, a, r in zip(completions, answers, records):
        opts = options(r)
        truth = answer_option(a, opts) if opts else None
        out.append(float(truth is not None and extract_choice(c, opts) == truth))
    return out


def terminated_answer(prompts, completions, answers, records) -> list[float]:
    """1.0 where the completion has some text and ended on a stop token."""
    return [float(bool(c.strip()) and getattr(c, "terminated", False)) for c in completions]


REWARDS: dict[str, RewardFn] = {"exact_once": exact_once, "choice": choice, "format": terminated_answer}


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    weight: float


def resolve(entries: Sequence[dict]) -> list[Reward]:
    """`grpo.rewards` entries -> rewards; a name that is neither built in nor importable is a ConfigError."""
    if not entries:
        raise ConfigError("grpo.rewards: give at least one {name, weight}")
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) - {"name", "weight"} or not isinstance(entry.get("name"), str):
            raise ConfigError(f"grpo.rewards: expected entries {{name: NAME, weight: W}}, got {entry!r}")
        name, weight = entry["name"], entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"grpo.rewards: the weight of {name} must be a number, got {weight!r}")
        out.append(Reward(name, _function(name), float(weight)))
    if len({r.name for r in out}) != len(out):
        raise ConfigError(f"grpo.rewards: a function is listed twice ({[r.name for r in out]})")
    return out


def _function(name: str) -> RewardFn:
    if name in REWARDS:
        return REWARDS[name]
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"grpo.rewards: {name!r} is neither one of {sorted(REWARDS)} nor module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"grpo.rewards: cannot load {name} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: {name} is not a function")
    return fn


def score(rewards: Sequence[Reward], prompts, completions, answers, records) -> np.ndarray:
    """Every reward function on the batch: float32 `[completions, functions]`."""
    out = np.zeros((len(completions), len(rewards)), np.float32)
    for j, r in enumerate(rewards):
        values = list(r.fn(prompts, completions, answers, records))
        if len(values) != len(completions):
            raise ValueError(f"reward {r.name} returned {len(values)} values for {len(completions)} completions")
        out[:, j] = values
    return out
