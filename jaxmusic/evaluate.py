"""`jaxmusic eval`: multiple-choice evaluation on MuCUE-style benchmark files.

Benchmark file: JSONL (or a JSON list), one item per line:
`{"id": ..., "audio": "a.wav" | [...], "time": [start, end] (optional), "question": "...",
"choices": ["...", ...], "answer": "B" | 1 | "option text", "subset": "tempo" (optional)}`.
`answer` is a letter (A = first choice), a 0-based integer index, or the text of one choice.
Audio paths are relative to `--audio-root` (default: the benchmark file's folder).

Modes:
* `generate` (MuCUE's protocol): the prompt is exactly
  `"Choose the correct option for the question based on the audio. " + question + " " + choices_text`
  with `choices_text` = `"A. first\\nB. second\\nC. third\\nD. fourth"` (MuCUE's public
  material does not spell the choice layout out; this is the common "letter, period, text, one
  per line" form). Greedy decoding, at most 64 new tokens, then `extract_choice` reads the
  chosen option; an answer it cannot read is counted as unparsed (and wrong), never guessed.
* `loglik`: the same prompt; each option's text is scored as the answer (sum of log p over
  its tokens and `<|im_end|>`, as `jaxmusic score`), the best total wins; an exact tie is
  counted as unparsed.

Accuracy = correct / scored, where scored items exclude skipped ones (an audio file that cannot
be decoded or cropped is reported and skipped). Results go to `--out`: `items.jsonl` (one line
per item, appended as the run goes: a rerun skips items already scored and retries skipped
ones), `results.json` (per-subset and overall accuracy, chance, counts, skipped items) and
`accuracy.png` (bar chart with chance marks). The overall figure is the micro average over all
scored items; `macro` is the mean over subsets (MuCUE's headline average).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxmusic import templates
from jaxmusic.errors import UserError, run_command

LETTERS = templates.LETTERS
MAX_NEW_TOKENS = 64
MODES = ("generate", "loglik")


# ------------------------------------------------------------------------------ extraction

_LONE_LETTER = re.compile(r"^[\s(\[]*([A-Za-z])[\s)\].:]*$")
_ANSWER_PHRASE = re.compile(r"\b(?i:answer|option|choice)\s*(?:is|:)?\s*[:\-]?\s*[(\[]?([A-Z])\b(?![-'])")
_LEADING_LETTER = re.compile(r"^[\s(\[]*([A-Z])(?:[)\]]|\s*[.:)])")
_BRACKETED = re.compile(r"[(\[]([A-Z])[)\]]")


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().strip(".:;,!\"'").strip().casefold()


def _option_spans(text: str, choices: Sequence[str]) -> list[tuple[int, int, int]]:
    """(start, end, option) of every whole-phrase, case-insensitive mention of an option's text."""
    spans = []
    for i, choice in enumerate(choices):
        c = _normalise(choice)
        if c:
            spans += [(m.start(), m.end(), i)
                      for m in re.finditer(r"(?<!\w)" + re.escape(c) + r"(?!\w)", text.casefold())]
    return spans


def extract_choice(output: str, choices: Sequence[str]) -> int | None:
    """The option a free-text answer picks, or None when it cannot be read without guessing.

    1. The whole answer is one option's text, or a lone letter ("B", "(b)", "B."); if these
       two readings disagree the answer is unparsed.
    2. Otherwise a letter: from answer phrases ("Answer: B", "the answer is (C)", "option D")
       or, if there are none, from a leading letter with punctuation ("B. minor", "(B) minor",
       "B) ...") and bracketed letters "(B)" anywhere. A capital that begins a mentioned
       option text ("the answer is A minor") is not a letter. Two different letters: unparsed.
    3. Option texts mentioned as whole phrases (a mention inside a longer option's mention,
       "fast" in "very fast", does not count). With a letter, the answer is that letter
       unless it mentions options that do not include the letter's; without one, it is the
       option mentioned if exactly one is.
    """
    valid = LETTERS[:len(choices)]
    whole = _normalise(output)
    if not whole:
        return None
    picks = {i for i, c in enumerate(choices) if _normalise(c) == whole}
    lone = _LONE_LETTER.match(output)
    if lone and lone.group(1).upper() in valid:
        picks.add(valid.index(lone.group(1).upper()))
    if picks:
        return picks.pop() if len(picks) == 1 else None

    spans = _option_spans(output, choices)
    option_starts = {a for a, b, _ in spans if b - a > 1}
    letter = None
    for patterns in ((_ANSWER_PHRASE,), (_LEADING_LETTER, _BRACKETED)):
        letters = {m.group(1) for p in patterns for m in p.finditer(output)
                   if m.start(1) not in option_starts} & set(valid)
        if len(letters) > 1:
            return None
        if letters:
            letter = valid.index(letters.pop())
            break
    mentioned = {i for a, b, i in spans
                 if not any(a2 <= a and b <= b2 and b2 - a2 > b - a for a2, b2, _ in spans)}
    if letter is not None:
        return letter if not mentioned or letter in mentioned else None
    return mentioned.pop() if len(mentioned) == 1 else None


# ------------------------------------------------------------------------------ benchmark

@dataclasses.dataclass(frozen=True)
class Item:
    key: str                    # position + content digest: what resume matches on
    id: str
    subset: str
    audio: tuple[str, ...]
    segments: tuple[tuple[float, float] | None, ...]
    question: str
    choices: tuple[str, ...]
    answer: int


def _answer_index(answer, choices: Sequence[str]) -> int:
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is neither a letter, an index nor a choice")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer index {answer} outside 0..{len(choices) - 1}")
        return answer
    if isinstance(answer, str):
        a = answer.strip()
        if len(a) == 1 and a.upper() in LETTERS[:len(choices)]:
            return LETTERS.index(a.upper())
        matches = [i for i, c in enumerate(choices) if c.strip() == a]
        if len(matches) == 1:
            return matches[0]
    raise ValueError(f"answer {answer!r} is neither a letter, a 0-based index nor one choice's text")


def _segments(time, n_audio: int):
    if time is None:
        return ()
    if len(time) == 2 and all(isinstance(t, (int, float)) for t in time):
        return (tuple(float(t) for t in time),)
    if len(time) != n_audio:
        raise ValueError(f"'time' has {len(time)} entries for {n_audio} audio files")
    return tuple(None if t is None else tuple(float(x) for x in t) for t in time)


def read_benchmark(path: str | Path, audio_root: str | Path | None = None, limit: int | None = None) -> list[Item]:
    """Parse and validate a benchmark file; a malformed item is a UserError naming its line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the benchmark ({e})") from None
    root = Path(audio_root) if audio_root is not None else path.parent
    if text.lstrip().startswith("["):
        try:
            rows = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
    items = []
    for n, d in rows[:limit] if limit is not None else rows:
        try:
            audio = d.get("audio", [])
            audio = [audio] if isinstance(audio, str) else list(audio)
            choices = d["choices"]
            if isinstance(choices, dict):  # {"A": ..., "B": ...}
                choices = [choices[k] for k in sorted(choices)]
            if len(choices) < 2 or not all(isinstance(c, str) for c in choices) or len(choices) > len(LETTERS):
                raise ValueError(f"'choices' must be 2-{len(LETTERS)} strings")
            if not isinstance(d["question"], str) or not d["question"].strip():
                raise ValueError("'question' must be a non-empty string")
            if d["question"].count(templates.AUDIO_PLACEHOLDER) not in (0, len(audio)):
                raise ValueError(f"the question has {d['question'].count(templates.AUDIO_PLACEHOLDER)} "
                                 f"{templates.AUDIO_PLACEHOLDER} tags for {len(audio)} audio files")
            digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
            items.append(Item(key=f"{n}:{digest}", id=str(d.get("id", n)), subset=str(d.get("subset") or "default"),
                              audio=tuple(str(root / a) for a in audio),
                              segments=_segments(d.get("time"), len(audio)), question=d["question"],
                              choices=tuple(choices), answer=_answer_index(d["answer"], choices)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}:{n}: not a benchmark item ({type(e).__name__}: {e}); expected "
                            '{"audio", "question", "choices", "answer", optional "time", "subset", "id"}') from None
    return items


# ------------------------------------------------------------------------------ model calls

def _pad_to(n: int, minimum: int = 1) -> int:
    """Next power of two: batch shapes come from a handful of sizes, so jit compiles rarely."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _generate(loaded, items: Sequence[Item], mels, batch_size: int) -> list[str]:
    """Greedy answers (at most 64 new tokens) to the MuCUE prompts of a batch."""
    from flax import nnx

    from jaxmusic import inference
    from jaxmusic.generate import generate

    tok = loaded.tokenizer
    texts = [templates.encode_prompt(templates.mucue_prompt(it.question, it.choices), len(it.audio), tok) for it in items]
    # generate compiles per batch size: pad with text-only rows, which cost the encoder nothing
    pad = batch_size - len(items)
    filler = templates.encode_prompt(".", 0, tok)
    plan, chunks = inference.layout_batch(loaded, texts + [filler] * pad, list(mels) + [[]] * pad)
    embeds = inference.embed_batch(loaded.model, chunks, np.asarray(plan.input_ids), np.asarray(plan.audio_index),
                              np.asarray(plan.is_audio))
    out = generate(nnx.split(loaded.model.llm), embeds, plan.lengths, max_new_tokens=MAX_NEW_TOKENS,
                   temperature=0.0, stop_ids=loaded.stop_ids)
    return [tok.decode([t for t in ids if t not in loaded.stop_ids], skip_special_tokens=True)
            for ids in out[:len(items)]]


@functools.cache
def _option_logprobs():
    """The jitted scorer, built on first use so that importing this module does not import JAX."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxmusic.losses import token_log_probs

    @nnx.jit
    def option_logprobs(model, mel, input_ids, audio_index, is_audio, positions, valid, label_pos, label_ids):
        """log p of each answer token; logits only at answer positions (the vocabulary can be 152k)."""
        embeds = model.inputs_embeds(mel, input_ids, audio_index, is_audio)
        h, _ = model.llm.hidden(embeds, positions, valid=valid)
        h = jnp.take_along_axis(h, label_pos[..., None], axis=1)                  # [R, K, D]
        return token_log_probs(model.llm.logits(h), label_ids)                    # [R, K]

    return option_logprobs


def _loglik(loaded, items: Sequence[Item], mels, batch_size: int) -> list[list[float]]:
    """Total log p of every option of every item, each item's audio encoded once for all its options."""
    from jaxmusic.models import splice_plan

    tok, cfg = loaded.tokenizer, loaded.cfg
    texts, owner = [], []
    for j, it in enumerate(items):
        prompt = templates.mucue_prompt(it.question, it.choices)
        texts += [templates.encode_scoring(prompt, c, len(it.audio), tok) for c in it.choices]
        owner += [j] * len(it.choices)
    # rows padded (with copies of row 0) to a size that is the same for every full batch
    rows = _pad_to(max(len(texts), batch_size * max(len(it.choices) for it in items)))
    pad = rows - len(texts)
    owner += [0] * pad
    counts = [[len(m) for m in mels[j]] for j in owner]
    tpc = cfg.tokens_per_chunk(loaded.frames // 2)
    plan = splice_plan.build_splice_plan(texts + texts[:1] * pad, counts, tokens_per_chunk=tpc,
                                   length_buckets=cfg.length_buckets, chunk_buckets=cfg.chunk_buckets,
                                   pad_id=tok.pad_token_id or 0)
    # build_splice_plan gives every row its own copy of the chunks; point all option rows of
    # an item at one copy instead, so the encoder runs once per item rather than once per option.
    row_first = np.concatenate([[0], np.cumsum([sum(c) for c in counts])[:-1]])
    item_chunks = [sum(len(m) for m in ms) for ms in mels]
    item_first = np.concatenate([[0], np.cumsum(item_chunks)[:-1]])
    shift = (row_first - item_first[owner]) * tpc
    audio_index = np.where(plan.is_audio, plan.audio_index - shift[:, None], 0).astype(np.int32)
    chunks = np.zeros((splice_plan.pick_bucket(max(sum(item_chunks), 1), cfg.chunk_buckets, "audio chunks per batch"),
                       loaded.n_mels, loaded.frames), np.float32)
    if sum(item_chunks):
        chunks[:sum(item_chunks)] = np.concatenate([m for ms in mels for m in ms])

    targets = plan.labels[:, 1:]               # the hidden state at t predicts the label at t + 1
    n_labels = (targets >= 0).sum(axis=1)
    k = _pad_to(int(n_labels.max()), 8)
    label_pos = np.zeros((rows, k), np.int32)
    label_ids = np.zeros((rows, k), np.int32)
    for r in range(rows):
        pos = np.flatnonzero(targets[r] >= 0)
        label_pos[r, :len(pos)], label_ids[r, :len(pos)] = pos, targets[r, pos]
    logp = np.asarray(_option_logprobs()(loaded.model, chunks, plan.input_ids, audio_index, plan.is_audio,
                                       plan.positions, plan.attention_mask, label_pos, label_ids))
    totals = [float(logp[r, :n_labels[r]].sum()) for r in range(len(texts))]
    out, r = [], 0
    for it in items:
        out.append(totals[r:r + len(it.choices)])
        r += len(it.choices)
    return out


# ------------------------------------------------------------------------------ running

def prepare_item(loaded, item: Item, mode: str):
    """`(log-mel chunks per audio file, None)`, or `(None, reason)` for an item to skip.

    Skipped: audio that cannot be read, decoded or cropped, and an item too long for the
    model's largest length bucket (so one bad item never stops a long benchmark).
    """
    from jaxmusic import inference

    try:
        request = inference.Request(question=item.question, audio=item.audio, segments=item.segments)
        mels = inference.request_mels(loaded, request)
    except (UserError, OSError, RuntimeError, ValueError) as e:  # AudioError is a UserError
        return None, f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
    tok, cfg = loaded.tokenizer, loaded.cfg
    prompt = templates.encode_prompt(templates.mucue_prompt(item.question, item.choices), len(item.audio), tok)
    answer = 1 + (max(len(tok(c, add_special_tokens=False)["input_ids"]) for c in item.choices)
                  if mode == "loglik" else 0)
    n_chunks = sum(map(len, mels))
    length = sum(len(p) for p in prompt.pieces) + answer + cfg.tokens_per_chunk(loaded.frames // 2) * n_chunks
    if length > cfg.length_buckets[-1]:
        return None, (f"{length} tokens (text and {n_chunks} audio chunks) exceed the largest "
                      f"length bucket {cfg.length_buckets[-1]} of the model's MuFun config")
    return mels, None


def _done_records(path: Path) -> dict[str, dict]:
    """Records already written (the last one per item wins); a torn last line is ignored."""
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                done[rec["key"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def _check_run(out: Path, run: dict) -> None:
    """An --out folder holds one (checkpoint, benchmark, mode) run, so resumed records are comparable."""
    meta = out / "run.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old != run:
            raise UserError(f"{out} holds results of another run ({old}); pass a different --out")
    else:
        meta.write_text(json.dumps(run, indent=1))


def _status(pred: int | None, answer: int) -> str:
    return "unparsed" if pred is None else ("correct" if pred == answer else "wrong")


def summarise(items: Sequence[Item], records: dict[str, dict]) -> dict:
    """Per-subset and overall counts, accuracy and chance from the item records."""
    subsets: dict[str, dict] = {}
    for it in items:
        rec = records[it.key]
        s = subsets.setdefault(it.subset, {"items": 0, "scored": 0, "correct": 0, "wrong": 0, "unparsed": 0,
                                           "skipped": 0, "chance_sum": 0.0})
        s["items"] += 1
        s[rec["status"]] += 1
        if rec["status"] != "skipped":
            s["scored"] += 1
            s["chance_sum"] += 1.0 / len(it.choices)
    for s in subsets.values():
        s["accuracy"] = s["correct"] / s["scored"] if s["scored"] else None
        s["chance"] = s.pop("chance_sum") / s["scored"] if s["scored"] else None
    scored = sum(s["scored"] for s in subsets.values())
    accs = [s["accuracy"] for s in subsets.values() if s["accuracy"] is not None]
    overall = {k: sum(s[k] for s in subsets.values()) for k in ("items", "scored", "correct", "wrong",
                                                                "unparsed", "skipped")}
    overall["accuracy"] = overall["correct"] / scored if scored else None
    overall["chance"] = (sum(s["chance"] * s["scored"] for s in subsets.values() if s["scored"]) / scored
                         if scored else None)
    overall["macro"] = sum(accs) / len(accs) if accs else None
    skipped = [{"id": it.id, "error": records[it.key].get("error")} for it in items
               if records[it.key]["status"] == "skipped"]
    return {"subsets": dict(sorted(subsets.items())), "overall": overall, "skipped_items": skipped}


def format_table(summary: dict) -> str:
    def pct(x):
        return "   -  " if x is None else f"{100 * x:5.1f}%"

    rows = list(summary["subsets"].items()) + [("overall", summary["overall"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'subset':<{width}}  {'items':>5}  {'scored':>6}  {'correct':>7}  {'unparsed':>8}  {'skipped':>7}"
             f"  {'accuracy':>8}  {'chance':>6}"]
    for name, s in rows:
        lines.append(f"{name:<{width}}  {s['items']:5d}  {s['scored']:6d}  {s['correct']:7d}  {s['unparsed']:8d}  "
                     f"{s['skipped']:7d}  {pct(s['accuracy']):>8}  {pct(s['chance']):>6}")
    if summary["overall"]["macro"] is not None:
        lines.append(f"macro average over subsets: {pct(summary['overall']['macro']).strip()}")
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, s) for n, s in summary["subsets"].items() if s["accuracy"] is not None]
    rows.append(("overall", summary["overall"]))
    names = [n for n, _ in rows]
    acc = np.array([100 * (s["accuracy"] or 0.0) for _, s in rows])
    chance = np.array([100 * (s["chance"] or 0.0) for _, s in rows])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.8))
    x = np.arange(len(names))
    bars = ax.bar(x, acc, color=["tab:blue"] * (len(names) - 1) + ["tab:gray"], label="accuracy")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.hlines(chance, x - 0.4, x + 0.4, colors="tab:red", linestyles="--", label="chance")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 115)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _score_batch(loaded, batch: Sequence[Item], prepared, mode: str, batch_size: int) -> list[dict]:
    """One record per item: skipped (with the reason), or the model's pick and its status."""
    records = [{"key": it.key, "id": it.id, "subset": it.subset, "status": "skipped", "error": error}
               for it, (_, error) in zip(batch, prepared) if error is not None]
    ready = [(it, mels) for it, (mels, _) in zip(batch, prepared) if mels is not None]
    if not ready:
        return records
    items, mels = zip(*ready)
    if mode == "generate":
        for it, text in zip(items, _generate(loaded, items, mels, batch_size)):
            pred = extract_choice(text, it.choices)
            records.append({"key": it.key, "id": it.id, "subset": it.subset, "status": _status(pred, it.answer),
                            "pred": pred, "answer": it.answer, "output": text})
    else:
        for it, scores in zip(items, _loglik(loaded, items, mels, batch_size)):
            best = int(np.argmax(scores))
            pred = best if scores.count(scores[best]) == 1 else None  # an exact tie is no decision
            records.append({"key": it.key, "id": it.id, "subset": it.subset, "status": _status(pred, it.answer),
                            "pred": pred, "answer": it.answer, "scores": scores})
    return records


def run(checkpoint: str, benchmark: str, *, audio_root: str | None = None, mode: str = "generate",
        limit: int | None = None, out: str | None = None, batch_size: int = 8, dtype: str = "float32",
        loaded=None, progress: bool = True) -> dict:
    """Evaluate `checkpoint` on `benchmark`; returns the summary (also written to `out`).

    `loaded` (an `inference.Loaded`) skips loading `checkpoint` again, e.g. right after training.
    """
    from tqdm import tqdm

    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; expected one of {MODES}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    items = read_benchmark(benchmark, audio_root, limit)
    if not items:
        raise UserError(f"{benchmark}: no items")
    out_dir = Path(out) if out else Path("eval_results") / f"{Path(benchmark).stem}-{mode}"
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run(out_dir, {"checkpoint": str(Path(checkpoint).resolve()), "benchmark": str(Path(benchmark).resolve()),
                         "mode": mode})
    log = out_dir / "items.jsonl"
    records = _done_records(log)
    todo = [it for it in items if records.get(it.key, {}).get("status") in (None, "skipped")]
    if todo and loaded is None:
        from jaxmusic import inference
        from jaxmusic.nn import ModelOptions

        loaded = inference.load(checkpoint, ModelOptions.from_names(param_dtype=dtype, dtype=dtype))

    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    with open(log, "a", encoding="utf-8") as f, ThreadPoolExecutor(1) as pool, \
            tqdm(total=len(items), initial=len(items) - len(todo), desc=f"eval ({mode})", unit="item",
                 disable=not progress) as bar:
        def prepare(batch):
            return [prepare_item(loaded, it, mode) for it in batch]

        upcoming = pool.submit(prepare, batches[0]) if batches else None
        for b, batch in enumerate(batches):
            prepared = upcoming.result()
            if b + 1 < len(batches):  # decode the next batch's audio while the model works on this one
                upcoming = pool.submit(prepare, batches[b + 1])
            new = _score_batch(loaded, batch, prepared, mode, batch_size)
            for rec in new:
                if rec["status"] == "skipped":
                    bar.write(f"skipped {rec['id']}: {rec['error']}")
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                records[rec["key"]] = rec
            f.flush()
            bar.update(len(batch))

    summary = summarise(items, records)
    summary.update(mode=mode, checkpoint=str(checkpoint), benchmark=str(benchmark), out=str(out_dir))
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out_dir / "accuracy.png", f"{Path(benchmark).name} ({mode})")
    return summary


# ------------------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="jaxmusic checkpoint folder, or a released MuFun (HF) folder")
    p.add_argument("--benchmark", required=True, metavar="FILE", help="MuCUE-style JSONL benchmark")
    p.add_argument("--audio-root", metavar="DIR", help="folder the audio paths are relative to "
                                                        "(default: the benchmark file's folder)")
    p.add_argument("--mode", choices=MODES, default="generate",
                   help="generate: MuCUE protocol (greedy answer, letter extraction); loglik: score each option")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N items")
    p.add_argument("--out", metavar="DIR", help="results folder (default eval_results/<benchmark>-<mode>); "
                                                 "rerunning with the same folder resumes")
    p.add_argument("--batch-size", type=int, default=8, help="items per batch")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and compute dtype (bfloat16 halves memory on GPUs)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxmusic eval", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)

    def evaluate():
        summary = run(args.checkpoint, args.benchmark, audio_root=args.audio_root, mode=args.mode,
                      limit=args.limit, out=args.out, batch_size=args.batch_size, dtype=args.dtype)
        print(format_table(summary))
        out = Path(summary["out"])
        print(f"results: {out / 'results.json'}, chart: {out / 'accuracy.png'}, per item: {out / 'items.jsonl'}")

    return run_command(evaluate)


if __name__ == "__main__":
    sys.exit(main())
