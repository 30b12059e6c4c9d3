"""`jaxmusic eval`: multiple-choice evaluation, MuCUE's protocol end to end.

    jaxmusic eval CKPT --benchmark PATH [--mode generate|loglik] [--judge QWEN3_CKPT] [--out DIR]
                       [--compare CKPT2 [--compare CKPT3 ...]]

PATH is jaxmusic's JSONL benchmark file, or MuCUE as published on the Hugging Face Hub (a
snapshot folder or one of its parquet files, read as it is; `jaxmusic.evaluation.benchmarks`).

Modes (both use MuCUE's prompt `"Choose the correct option for the question based on the
audio. " + question + " " + choices_text`, with MuCUE's `choices_text` verbatim):

* `generate` (MuCUE-Bench's protocol): greedy decoding, at most 64 new tokens, then a letter is
  read from the answer, by `extract_choice` (rules, no model) or, with `--judge`, by a Qwen3
  judge as MuCUE-Bench does (`jaxmusic.evaluation.judge`: its prompt, temperature 0.1, 32
  tokens, seeded per item). Both readings are recorded and their parse rates reported; the
  judge's decides when there is one. An answer that yields no letter is unparsed (and wrong),
  never guessed.
* `loglik` (no judge needed): each option's text is scored as the answer (sum of log p over its
  tokens and `<|im_end|>`, as `jaxmusic score`); the best total wins, an exact tie is unparsed.

Accuracy = correct / scored, per subset; the macro average over subsets is MuCUE's headline
AVG, the micro average is over items; the published MuCUE-Bench rows are shown beside the
subsets they cover (`jaxmusic.evaluation.report`). An item whose audio cannot be decoded or
cropped, or that is too long for the model, is reported, counted as skipped and retried by a
rerun. Results go to `--out`: `items.jsonl` (one record per item), `results.json` (per-subset
`items`, `scored`, `correct`, `wrong`, `unparsed`, `skipped`, accuracy, chance; macro and micro
averages; the published rows; parse rates; skipped items) and `accuracy.png`.

Side by side (`--compare`): every checkpoint (MuFun, Qwen2-Audio, ...) is evaluated in turn
on the same items, each into its own folder `OUT/<i>-<name>/` (resumable as above), then one
table and one chart (`OUT/compare.json`, `OUT/compare.png`) give a column per model and, per
subset, each model's difference from the first with its standard error, paired over the items
both scored (`jaxmusic.evaluation.report.compare`).

Scale: items go to the model in batches of `--batch-size`; several processes (`launch/local.py
-n 8 --gpus-per-process 1 -- jaxmusic eval ...`, or `launch/slurm.sbatch eval ...`) each score
their block of the items on their own device and the results are merged
(`jaxmusic.evaluation.records`). A rerun of the same command, on any number of processes,
scores only what is missing; SIGTERM stops every process after its current batch (exit 75).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from jaxmusic import templates
from jaxmusic.errors import UserError, run_command
from jaxmusic.evaluation import records as records_lib
from jaxmusic.evaluation.benchmarks import Item, ParquetAudio, read_benchmark
from jaxmusic.evaluation.report import (compare, format_comparison, format_table, plot, plot_comparison,
                                        summarise)

LETTERS = templates.LETTERS
MAX_NEW_TOKENS = 64
MODES = ("generate", "loglik")
EXIT_PREEMPTED = 75     # as `jaxmusic train`: stopped by SIGTERM, rerun to resume
WAIT_SECONDS = 2.0      # how often process 0 looks for the other processes' records


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


# ------------------------------------------------------------------------------ model calls

def _pad_to(n: int, minimum: int = 1) -> int:
    """Next power of two: batch shapes come from a handful of sizes, so jit compiles rarely."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def _generate(loaded, items: Sequence[Item], audio, batch_size: int) -> list[str]:
    """Greedy answers (at most 64 new tokens) to the MuCUE prompts of a batch (`audio`: each
    item's `prepare_item` result)."""
    from flax import nnx

    from jaxmusic import inference
    from jaxmusic.generate import generate

    tok = loaded.tokenizer
    template = loaded.cfg.prompt_template
    texts = [templates.encode_prompt(it.prompt, len(it.audio), tok, template=template) for it in items]
    # generate compiles per batch size: pad with text-only rows, which cost the encoder nothing
    pad = batch_size - len(items)
    filler = templates.encode_prompt(".", 0, tok, template=template)
    mels, frames = zip(*audio)
    plan, chunks = inference.layout_batch(loaded, texts + [filler] * pad, list(mels) + [[]] * pad,
                                          list(frames) + [[]] * pad)
    embeds = inference.embed_batch(loaded.model, chunks, np.asarray(plan.input_ids), np.asarray(plan.audio_index),
                                   np.asarray(plan.is_audio), chunk_frames=plan.chunk_frames)
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
    def option_logprobs(model, mel, input_ids, audio_index, is_audio, positions, valid, label_pos, label_ids,
                        chunk_frames=None):
        """log p of each answer token; logits only at answer positions (the vocabulary can be 152k)."""
        embeds = model.inputs_embeds(mel, input_ids, audio_index, is_audio, valid_frames=chunk_frames)
        h, _ = model.llm.hidden(embeds, positions, valid=valid)
        h = jnp.take_along_axis(h, label_pos[..., None], axis=1)                  # [R, K, D]
        return token_log_probs(model.llm.logits(h), label_ids)                    # [R, K]

    return option_logprobs


def _loglik(loaded, items: Sequence[Item], audio, batch_size: int) -> list[list[float]]:
    """Total log p of every option of every item, each item's audio encoded once for all its options."""
    from jaxmusic.inference import padding_layout
    from jaxmusic.models import splice_plan

    mels, frames = zip(*audio)
    tok, cfg = loaded.tokenizer, loaded.cfg
    texts, owner = [], []
    for j, it in enumerate(items):
        prompt = it.prompt
        texts += [templates.encode_scoring(prompt, c, len(it.audio), tok, template=cfg.prompt_template)
                  for c in it.choices]
        owner += [j] * len(it.choices)
    # rows padded (with copies of row 0) to a size that is the same for every full batch
    rows = _pad_to(max(len(texts), batch_size * max(len(it.choices) for it in items)))
    pad = rows - len(texts)
    owner += [0] * pad
    counts = [[len(m) for m in mels[j]] for j in owner]
    tpc = cfg.tokens_per_chunk(loaded.frames // 2)
    padding = padding_layout(loaded, [frames[j] for j in owner])
    plan = splice_plan.build_splice_plan(texts + texts[:1] * pad, counts, tokens_per_chunk=tpc,
                                   length_buckets=cfg.length_buckets, chunk_buckets=cfg.chunk_buckets,
                                   pad_id=tok.pad_token_id or 0, chunk_tokens=padding.get("chunk_tokens"))
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
    chunk_frames = None
    if padding:  # the items' own chunks, in the order of `chunks`
        valid = [e for files in padding_layout(loaded, frames)["chunk_frames"] for f in files for e in f]
        chunk_frames = np.full(len(chunks), max(valid + [1]), np.int32)
        chunk_frames[:len(valid)] = valid

    targets = plan.labels[:, 1:]               # the hidden state at t predicts the label at t + 1
    n_labels = (targets >= 0).sum(axis=1)
    k = _pad_to(int(n_labels.max()), 8)
    label_pos = np.zeros((rows, k), np.int32)
    label_ids = np.zeros((rows, k), np.int32)
    for r in range(rows):
        pos = np.flatnonzero(targets[r] >= 0)
        label_pos[r, :len(pos)], label_ids[r, :len(pos)] = pos, targets[r, pos]
    logp = np.asarray(_option_logprobs()(loaded.model, chunks, plan.input_ids, audio_index, plan.is_audio,
                                       plan.positions, plan.attention_mask, label_pos, label_ids, chunk_frames))
    totals = [float(logp[r, :n_labels[r]].sum()) for r in range(len(texts))]
    out, r = [], 0
    for it in items:
        out.append(totals[r:r + len(it.choices)])
        r += len(it.choices)
    return out


# ------------------------------------------------------------------------------ running

def prepare_item(loaded, item: Item, mode: str):
    """`((log-mel chunks per audio file, their frames of audio), None)` (`inference.request_audio`),
    or `(None, reason)` for an item to skip.

    Skipped: audio that cannot be read, decoded or cropped, an item too long for the model's
    largest length bucket, and in loglik mode an item whose option texts are unknown (a MuCUE
    `choices_text` layout `split_choices` does not read), so one bad item never stops a run.
    """
    from jaxmusic import inference

    if mode == "loglik" and not all(item.choices):
        return None, f"loglik scores option texts; cannot split choices_text {item.choices_text!r} into options"
    where = ""
    try:
        sources = []
        for src in item.audio:
            where = f"{src}: " if isinstance(src, ParquetAudio) else ""
            data = src.read() if isinstance(src, ParquetAudio) else src
            if data is None:
                raise UserError("the row holds no audio bytes")
            sources.append(data)
        request = inference.Request(question=item.question, audio=tuple(sources), segments=item.segments)
        mels, frames = inference.request_audio(loaded, request)
    except (UserError, OSError, RuntimeError, ValueError) as e:  # AudioError is a UserError
        return None, where + (str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
    tok, cfg = loaded.tokenizer, loaded.cfg
    prompt = templates.encode_prompt(item.prompt, len(item.audio), tok, template=cfg.prompt_template)
    answer = 1 + (max(len(tok(c, add_special_tokens=False)["input_ids"]) for c in item.choices)
                  if mode == "loglik" else 0)
    n_chunks = sum(map(len, mels))
    length = sum(len(p) for p in prompt.pieces) + answer + cfg.tokens_per_chunk(loaded.frames // 2) * n_chunks
    if length > cfg.length_buckets[-1]:
        return None, (f"{length} tokens (text and {n_chunks} audio chunks) exceed the largest "
                      f"length bucket {cfg.length_buckets[-1]} of the model's MuFun config")
    return (mels, frames), None


def _status(pred: int | None, answer: int) -> str:
    return "unparsed" if pred is None else ("correct" if pred == answer else "wrong")


def _score_batch(loaded, batch: Sequence[Item], prepared, mode: str, batch_size: int, judge=None) -> list[dict]:
    """One record per item: skipped (with the reason), or the model's pick and its status."""
    records = [{"key": it.key, "id": it.id, "subset": it.subset, "status": "skipped", "error": error}
               for it, (_, error) in zip(batch, prepared) if error is not None]
    ready = [(it, audio) for it, (audio, _) in zip(batch, prepared) if audio is not None]
    if not ready:
        return records
    items, audio = zip(*ready)
    if mode == "generate":
        from jaxmusic.evaluation.judge import read_letter

        outputs = _generate(loaded, items, audio, batch_size)
        replies = (judge.replies([it.key for it in items], [it.choices_text for it in items], outputs, batch_size)
                   if judge is not None else [None] * len(items))
        for it, text, reply in zip(items, outputs, replies):
            rec = {"key": it.key, "id": it.id, "subset": it.subset, "answer": it.answer, "output": text,
                   "pred_rule": extract_choice(text, it.choices)}
            if reply is not None:
                rec.update(judge_reply=reply, pred_judge=read_letter(reply, len(it.choices)))
            rec["pred"] = rec["pred_judge"] if reply is not None else rec["pred_rule"]
            rec["status"] = _status(rec["pred"], it.answer)
            records.append(rec)
    else:
        for it, scores in zip(items, _loglik(loaded, items, audio, batch_size)):
            best = int(np.argmax(scores))
            pred = best if scores.count(scores[best]) == 1 else None  # an exact tie is no decision
            records.append({"key": it.key, "id": it.id, "subset": it.subset, "status": _status(pred, it.answer),
                            "pred": pred, "answer": it.answer, "scores": scores})
    return records


class Interrupted(Exception):
    """A stop was requested (SIGTERM); what was scored is on disk and a rerun resumes."""


def _wait_for_all(out: Path, keys: Sequence[str], stop, progress: bool) -> None:
    """Process 0: until every item has a record (the other processes' blocks included)."""
    from tqdm import tqdm

    with tqdm(total=len(keys), desc="waiting for the other processes", unit="item", disable=not progress) as bar:
        while True:
            recorded = records_lib.read_records(out)
            bar.update(sum(k in recorded for k in keys) - bar.n)
            if bar.n == len(keys):
                return
            if stop is not None and stop():
                raise Interrupted("stopped while waiting for the other processes")
            time.sleep(WAIT_SECONDS)


def run(checkpoint: str, benchmark: str, *, audio_root: str | None = None, mode: str = "generate",
        limit: int | None = None, out: str | None = None, batch_size: int = 8, dtype: str = "float32",
        loaded=None, progress: bool = True, judge: str | None = None, judge_temperature: float = 0.1,
        judge_seed: int = 0, process: tuple[int, int] = (0, 1),
        stop: Callable[[], bool] | None = None) -> dict | None:
    """Evaluate `checkpoint` on `benchmark`; returns the summary (also written to `out`).

    `loaded` (an `inference.Loaded`) skips loading `checkpoint` again, e.g. right after training.
    `judge`: a Qwen3 checkpoint that reads the letters (generate mode). `process`: (index,
    count) of this process in a multi-process run, which scores its block of the items; the
    summary is None when other processes are still scoring theirs (the last one to finish
    writes the results). `stop()`, checked after every batch, ends the run with `Interrupted`.
    """
    from tqdm import tqdm

    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; expected one of {MODES}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if judge is not None and mode != "generate":
        raise UserError("--judge reads letters from generated answers: it needs --mode generate")
    items = read_benchmark(benchmark, audio_root, limit)
    if not items:
        raise UserError(f"{benchmark}: no items")
    index, count = process
    out_dir = Path(out) if out else Path("eval_results") / f"{Path(benchmark).stem}-{mode}"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(Path(checkpoint).resolve()), "benchmark": str(Path(benchmark).resolve()), "mode": mode}
    if judge is not None:
        meta.update(judge=str(Path(judge).resolve()), judge_temperature=judge_temperature, judge_seed=judge_seed)
    records_lib.check_run(out_dir, meta)
    done = records_lib.read_records(out_dir)
    mine = items[records_lib.block(len(items), index, count)]
    todo = [it for it in mine if done.get(it.key, {}).get("status") in (None, "skipped")]
    judge_model = None
    if todo:
        from jaxmusic import inference
        from jaxmusic.nn import ModelOptions

        if loaded is None:
            loaded = inference.load(checkpoint, ModelOptions.from_names(param_dtype=dtype, dtype=dtype))
        if judge is not None:
            from jaxmusic.evaluation.judge import Judge

            judge_model = Judge(judge, dtype=dtype, temperature=judge_temperature, seed=judge_seed)

    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    where = f" [process {index} of {count}]" if count > 1 else ""
    with records_lib.open_record_file(out_dir, index, count) as f, \
            ThreadPoolExecutor(1) as pool, \
            tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"eval ({mode}){where}", unit="item",
                 disable=not progress) as bar:
        def prepare(batch):
            return [prepare_item(loaded, it, mode) for it in batch]

        upcoming = pool.submit(prepare, batches[0]) if batches else None
        for b, batch in enumerate(batches):
            prepared = upcoming.result()
            if b + 1 < len(batches):  # decode the next batch's audio while the model works on this one
                upcoming = pool.submit(prepare, batches[b + 1])
            for rec in _score_batch(loaded, batch, prepared, mode, batch_size, judge_model):
                if rec["status"] == "skipped":
                    bar.write(f"skipped {rec['id']}: {rec['error']}")
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))
            if stop is not None and stop() and b + 1 < len(batches):
                upcoming.cancel()
                raise Interrupted(f"stopped after {bar.n} of this process's {len(mine)} items")

    keys = [it.key for it in items]
    if index == 0 and count > 1:
        _wait_for_all(out_dir, keys, stop, progress)
    with records_lib.merge_lock(out_dir):
        recorded = records_lib.read_records(out_dir)
        if any(k not in recorded for k in keys):
            return None  # others are still scoring; the last to finish writes the results
        records_lib.write_merged(out_dir, keys, recorded)
        summary = summarise(items, recorded)
        summary.update(mode=mode, checkpoint=str(checkpoint), benchmark=str(benchmark), judge=judge,
                       out=str(out_dir))
        (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
        plot(summary, out_dir / "accuracy.png", f"{Path(benchmark).name} ({mode})")
    return summary


# ------------------------------------------------------------------------------ CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    from jaxmusic import distributed

    p.add_argument("checkpoint", help="jaxmusic checkpoint folder, or a released MuFun or Qwen2-Audio (HF) folder")
    p.add_argument("--compare", action="append", default=[], metavar="CKPT",
                   help="also evaluate this checkpoint on the same items and report the models side by "
                        "side, with per-subset differences from the first (repeatable)")
    p.add_argument("--benchmark", required=True, metavar="PATH",
                   help="a JSONL benchmark file, or MuCUE as published: a Hub snapshot folder or one of its "
                        "parquet files")
    p.add_argument("--audio-root", metavar="DIR", help="folder a JSONL file's audio paths are relative to "
                                                        "(default: the benchmark file's folder)")
    p.add_argument("--mode", choices=MODES, default="generate",
                   help="generate: MuCUE protocol (greedy answer, letter extraction); loglik: score each option")
    p.add_argument("--judge", metavar="QWEN3_CKPT",
                   help="read the letters with this Qwen3 (HF folder or jaxmusic checkpoint), as MuCUE-Bench "
                        "does with Qwen3-8B; default: the rule-based extractor")
    p.add_argument("--judge-temperature", type=float, default=0.1,
                   help="the judge's sampling temperature (MuCUE-Bench: 0.1; 0 = greedy, batched)")
    p.add_argument("--judge-seed", type=int, default=0, help="seed of the judge's sampling (per item)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N items")
    p.add_argument("--out", metavar="DIR", help="results folder (default eval_results/<benchmark>-<mode>); "
                                                 "rerunning with the same folder resumes")
    p.add_argument("--batch-size", type=int, default=8, help="items per batch")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and compute dtype (bfloat16 halves memory on GPUs)")
    distributed.add_arguments(p)


def model_label(index: int, checkpoint: str) -> str:
    """`<index>-<folder name>`: distinct even for checkpoints in same-named folders."""
    return f"{index}-{Path(checkpoint).resolve().name}"


def _compare(checkpoints: Sequence[str], benchmark: str, out: str | None, kw: dict) -> int | None:
    """Evaluate each checkpoint into `OUT/<label>/`, then the side-by-side table and chart."""
    root = Path(out) if out else Path("eval_results") / f"{Path(benchmark).stem}-{kw['mode']}-compare"
    labels = [model_label(i, c) for i, c in enumerate(checkpoints)]
    summaries = [run(c, benchmark, out=str(root / label), **kw) for c, label in zip(checkpoints, labels)]
    if any(s is None for s in summaries):
        print("this process's items are scored; the last process to finish writes the results")
        return None
    items = read_benchmark(benchmark, kw["audio_root"], kw["limit"])
    cmp = compare(items, [(label, records_lib.read_records(root / label)) for label in labels])
    cmp.update(checkpoints=dict(zip(labels, map(str, checkpoints))), benchmark=str(benchmark), mode=kw["mode"])
    (root / "compare.json").write_text(json.dumps(cmp, indent=1))
    plot_comparison(cmp, root / "compare.png", f"{Path(benchmark).name} ({kw['mode']})")
    print(format_comparison(cmp))
    print(f"comparison: {root / 'compare.json'}, chart: {root / 'compare.png'}; per model: "
          + ", ".join(str(root / label) for label in labels))
    return None


def _use_own_devices(layout) -> None:
    """Under SLURM every task may see all GPUs of its node: keep to this process's own."""
    if layout is not None and layout.local_device_ids is not None:
        import jax

        jax.config.update("jax_cuda_visible_devices", ",".join(map(str, layout.local_device_ids)))


def main(argv: list[str] | None = None) -> int:
    from jaxmusic import distributed

    parser = argparse.ArgumentParser(prog="jaxmusic eval", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    requested = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: requested.set())

    def evaluate():
        layout = distributed.resolve_layout(args.coordinator, args.num_processes, args.process_id)
        _use_own_devices(layout)
        process = (layout.process_id, layout.num_processes) if layout else (0, 1)
        kw = dict(audio_root=args.audio_root, mode=args.mode, limit=args.limit, batch_size=args.batch_size,
                  dtype=args.dtype, judge=args.judge, judge_temperature=args.judge_temperature,
                  judge_seed=args.judge_seed, process=process, stop=requested.is_set)
        try:
            if args.compare:
                return _compare([args.checkpoint] + args.compare, args.benchmark, args.out, kw)
            summary = run(args.checkpoint, args.benchmark, out=args.out, **kw)
        except Interrupted as e:
            print(f"{e} (SIGTERM); rerun the same command to resume", file=sys.stderr)
            return EXIT_PREEMPTED
        if summary is None:
            print(f"process {process[0]} of {process[1]}: its items are scored; the last process to finish "
                  "writes the results")
            return None
        print(format_table(summary))
        out = Path(summary["out"])
        print(f"results: {out / 'results.json'}, chart: {out / 'accuracy.png'}, per item: {out / 'items.jsonl'}")

    return run_command(evaluate)


if __name__ == "__main__":
    sys.exit(main())
