"""`jaxmusic eval` on MuCUE as published: a Hub snapshot built here with pyarrow, read as it is.

The snapshot has three subsets, one of them in two parquet files; the audio is embedded as wav,
flac and mp3 bytes (one row's bytes are not audio at all), `time_seg` crops some rows (one
beyond its clip's end), and `choices_text` comes in four layouts, one of which hides the option
texts. The model is MuFun forced to answer "blues" (`forced_model`), so every item's status,
each subset's accuracy and the averages are known in advance; the `--judge` is a Qwen3 forced
to reply "C". Then the multi-process path: an interrupted run resumed by two processes
(`launch/local.py`) scores only what is missing and ends with an uninterrupted run's results.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from forced_model import FORCED, forced_mufun_checkpoint, save_forced_qwen3

from jaxmusic import checkpoints, inference, templates
from jaxmusic.evaluation import evaluate
from jaxmusic.demo.tokenizer import train_tokenizer
from jaxmusic.evaluation import benchmarks, judge as judge_lib, report

REPO = Path(__file__).resolve().parent.parent
SR = 16000


def _encoded(fmt: str, seconds: float, sr: int, freq: float) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format=fmt.upper())
    return buf.getvalue()


WAV, FLAC, MP3 = _encoded("wav", 3.0, SR, 440), _encoded("flac", 2.5, 22050, 330), _encoded("mp3", 2.0, SR, 220)
GARBAGE = b"RIFF\x00\x00\x00\x00WAVEnot audio at all" * 8

# (split, file, audio bytes, question, choices_text, correct, time_seg, status with the rule, with the judge "C")
ROWS = [
    ("gtzan", 0, WAV, "Which genre is this?", "A. jazz\nB. blues\nC. rock\nD. pop", "B", None, "correct", "wrong"),
    ("gtzan", 0, FLAC, "What genre?", "(A) blues (B) jazz (C) rock (D) pop", "A", None, "correct", "wrong"),
    ("gtzan", 1, MP3, "Genre of the clip?", "A: rock; B: pop; C: blues; D: jazz", "C", [0.5, 1.5], "correct", "correct"),
    ("gtzan", 1, GARBAGE, "Genre?", "A. jazz\nB. blues\nC. rock\nD. pop", "B", None, "skipped", "skipped"),
    ("mmau_music", 0, WAV, "Which style?", "A. jazz\nB. blues\nC. rock\nD. pop", "B", [5, 9], "skipped", "skipped"),
    ("mmau_music", 0, WAV, "Which style?", "A. rock\nB. pop\nC. jazz\nD. metal", "C", [1, 2.5], "unparsed", "correct"),
    ("mmau_music", 0, FLAC, "Which one?", "Options: jazz | blues | rock | pop", "B", None, "unparsed", "wrong"),
    ("nsyn_pitch", 0, MP3, "Which label?", "A. blues\nB. C4", "A", None, "correct", "unparsed"),
]
SPLIT_ORDER = ["nsyn_pitch", "gtzan", "mmau_music"]  # the dataset card's order, not alphabetical


def _expected(column: int) -> dict[str, tuple[int, int, int, int]]:
    """Per subset: (scored, correct, unparsed, skipped) for the rule (7) or judge (8) statuses."""
    out = {}
    for row in ROWS:
        statuses = [r[column] for r in ROWS if r[0] == row[0]]
        out[row[0]] = (sum(s != "skipped" for s in statuses), statuses.count("correct"),
                       statuses.count("unparsed"), statuses.count("skipped"))
    return out


def write_snapshot(root: Path, card: bool = True) -> Path:
    """A local snapshot of MuCUE's layout: data/<split>-NNNNN-of-NNNNN.parquet (+ README.md)."""
    (root / "data").mkdir(parents=True)
    files = {}
    for split, file, audio, question, choices, correct, seg, *_ in ROWS:
        files.setdefault((split, file), []).append({"audio": {"bytes": audio, "path": f"{split}_{file}.audio"},
                                                    "question": question, "choices_text": choices,
                                                    "correct_choice": correct, "time_seg": seg})
    schema = pa.schema([("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("question", pa.string()), ("choices_text", pa.string()), ("correct_choice", pa.string()),
                        ("time_seg", pa.list_(pa.float64()))])
    for (split, file), rows in files.items():
        n = 1 + max(f for s, f in files if s == split)
        # one row per row group: reading an item's audio must find its own group
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "data" / f"{split}-{file:05d}-of-{n:05d}.parquet",
                       row_group_size=1)
    if card:
        entries = "\n".join(f"  - split: {s}\n    path: data/{s}-*" for s in SPLIT_ORDER)
        (root / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{entries}\n"
                                        "license: cc-by-4.0\n---\n# MuCUE\n")
    return root


def judge_tokenizer():
    """A byte-level BPE trained on the judge's own prompts, with Qwen's chat markers."""
    tok = train_tokenizer([judge_lib.judge_text(r[4], FORCED) for r in ROWS], vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return tok


@pytest.fixture(scope="module")
def mucue(tmp_path_factory):
    root = tmp_path_factory.mktemp("mucue")
    snapshot = write_snapshot(root / "MuCUE")
    texts = [templates.SYSTEM, "USER: ASSISTANT: " + FORCED + " jazz rock pop metal C4"]
    texts += [templates.MUCUE_INSTRUCTION + r[3] + " " + r[4] for r in ROWS]
    tok = train_tokenizer(texts, vocab_size=300)
    ckpt = forced_mufun_checkpoint(root, tok)
    jtok = judge_tokenizer()
    last = jtok(judge_lib.judge_text(ROWS[0][4], FORCED), add_special_tokens=False)["input_ids"][-1]
    letter, end = jtok("C", add_special_tokens=False)["input_ids"], jtok.convert_tokens_to_ids("<|im_end|>")
    assert len(letter) == 1
    save_forced_qwen3(root / "judge", jtok, {last: letter[0], letter[0]: end})
    return root, snapshot, ckpt, inference.load(ckpt)


# ------------------------------------------------------------------------------ reading

def test_snapshot_is_read_as_published(mucue, tmp_path):
    root, snapshot, _, _ = mucue
    items = benchmarks.read_benchmark(snapshot)
    assert [it.subset for it in items] == [r[0] for r in sorted(ROWS, key=lambda r: SPLIT_ORDER.index(r[0]))]
    by_text = {(it.subset, it.question, it.choices_text): it for it in items}
    for split, _, _, question, choices, correct, seg, *_ in ROWS:
        it = by_text[(split, question, choices)]
        assert it.prompt == ("Choose the correct option for the question based on the audio. "
                             + question + " " + choices)  # choices_text verbatim
        assert it.answer == "ABCD".index(correct)
        assert it.segments == (() if seg is None else ((float(seg[0]), float(seg[1])),))
    gtzan = [it for it in items if it.subset == "gtzan"]
    assert [it.choices for it in gtzan[:3]] == [("jazz", "blues", "rock", "pop"), ("blues", "jazz", "rock", "pop"),
                                               ("rock", "pop", "blues", "jazz")]
    hidden = by_text[("mmau_music", "Which one?", "Options: jazz | blues | rock | pop")]
    assert hidden.choices == ("", "", "", "")  # four unnamed options: letters only
    assert by_text[("nsyn_pitch", "Which label?", "A. blues\nB. C4")].choices == ("blues", "C4")
    # the embedded bytes are what gets decoded: the mp3 row with its crop
    mp3 = gtzan[2]
    assert mp3.audio[0].read() == MP3 and "gtzan_1.audio" in str(mp3.audio[0])
    # without a dataset card the files are found by their names; one parquet file alone works too
    bare = write_snapshot(tmp_path / "bare", card=False)
    assert sorted(it.key for it in benchmarks.read_benchmark(bare)) == sorted(it.key for it in items)
    one = benchmarks.read_benchmark(snapshot / "data" / "gtzan-00001-of-00002.parquet")
    assert [it.subset for it in one] == ["gtzan", "gtzan"]


@pytest.mark.parametrize("text, options", [
    ("A. C major\nB. A minor\nC. E minor\nD. F major", ["C major", "A minor", "E minor", "F major"]),
    ("(A) slow (B) fast", ["slow", "fast"]),
    ("A: 1; B: 2; C: 3", ["1", "2", "3"]),
    ("[A] x, [B] y", ["x", "y"]),
    ("A) one B) two", ["one", "two"]),
    ("just one option", None), ("A. only", None),
])
def test_split_choices(text, options):
    assert benchmarks.split_choices(text) == options


def test_malformed_rows_and_folders_are_one_line_errors(tmp_path):
    from jaxmusic.errors import UserError

    pq.write_table(pa.table({"question": ["q"], "choices_text": ["A. x\nB. y"]}), tmp_path / "x-00000-of-00001.parquet")
    with pytest.raises(UserError, match=r"not a MuCUE file: no column correct_choice, audio"):
        benchmarks.read_benchmark(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = [{"audio": {"bytes": WAV, "path": "a.wav"}, "question": "q", "choices_text": "A. x\nB. y",
             "correct_choice": "E", "time_seg": None}]
    pq.write_table(pa.Table.from_pylist(rows), bad / "s-00000-of-00001.parquet")
    with pytest.raises(UserError, match=r"s-00000-of-00001.parquet row 0: not a MuCUE item .*'E'"):
        benchmarks.read_benchmark(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no parquet files"):
        benchmarks.read_benchmark(empty)


# ------------------------------------------------------------------------------ scoring

def _check(summary: dict, column: int):
    want = _expected(column)
    for split, (scored, correct, unparsed, skipped) in want.items():
        s = summary["subsets"][split]
        assert (s["scored"], s["correct"], s["unparsed"], s["skipped"]) == (scored, correct, unparsed, skipped), split
        assert s["accuracy"] == correct / scored
    accs = [c / s for s, c, _, _ in want.values()]
    assert summary["overall"]["macro"] == pytest.approx(sum(accs) / len(accs), abs=1e-12)
    assert summary["overall"]["accuracy"] == sum(c for _, c, _, _ in want.values()) / sum(
        s for s, _, _, _ in want.values())


def test_forced_model_scores_exactly_per_subset_and_macro(mucue, tmp_path):
    root, snapshot, ckpt, loaded = mucue
    summary = evaluate.run(str(ckpt), str(snapshot), out=str(tmp_path), batch_size=3, loaded=loaded, progress=False)
    _check(summary, 7)
    assert summary["overall"]["macro"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert summary["extraction"] == {"rule": {"answers": 6, "parsed": 4, "rate": 4 / 6}}
    records = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert {r.get("output") for r in records} == {FORCED, None}  # the model really is forced
    errors = {r["subset"]: r["error"] for r in records if r["status"] == "skipped"}
    assert "cannot decode audio" in errors["gtzan"] and "gtzan-00001-of-00002.parquet row 1" in errors["gtzan"]
    assert "start is at or beyond the end" in errors["mmau_music"]
    # results.json keeps the counts; the published rows sit beside the three shared subsets
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {k: saved["subsets"]["gtzan"][k] for k in ("scored", "correct", "unparsed", "skipped")} == dict(
        zip(("scored", "correct", "unparsed", "skipped"), _expected(7)["gtzan"]))
    pub = saved["published"]
    assert pub["subsets"] == ["gtzan", "mmau_music", "nsyn_pitch"]
    assert pub["models"]["MuFun"]["subsets"] == {"gtzan": 81.3, "mmau_music": 66.5, "nsyn_pitch": 77.2}
    assert pub["models"]["MuFun"]["avg"] == pytest.approx((81.3 + 66.5 + 77.2) / 3, abs=0.005)
    assert pub["yours_avg"] == pytest.approx(100 * 2 / 3, abs=0.005)
    table = report.format_table(summary)
    assert "Qwen2.5-Omni" in table and "AVG over the 3 subsets with published figures" in table
    assert "letters read by the rule extractor: 4 of 6 answers" in table
    assert (tmp_path / "accuracy.png").stat().st_size > 5000


def test_judge_reads_the_letters_and_both_parse_rates_are_reported(mucue, tmp_path, monkeypatch):
    root, snapshot, ckpt, loaded = mucue
    monkeypatch.setenv("JAXMUSIC_CACHE", str(tmp_path / "cache"))  # the HF judge folder is imported there
    summary = evaluate.run(str(ckpt), str(snapshot), out=str(tmp_path / "hf"), batch_size=4, loaded=loaded,
                           judge=str(root / "judge"), progress=False)
    _check(summary, 8)
    assert summary["extraction"]["judge"] == {"answers": 6, "parsed": 5, "rate": 5 / 6}
    assert summary["extraction"]["rule"]["parsed"] == 4
    records = [json.loads(line) for line in (tmp_path / "hf" / "items.jsonl").read_text().splitlines()]
    assert {r["judge_reply"] for r in records if "judge_reply" in r} == {"C"}
    # the judge as a jaxmusic checkpoint, greedy and batched: the same letters
    jax_judge = tmp_path / "judge_ckpt"
    checkpoints.import_hf(jax_judge, llm=str(root / "judge"))
    greedy = evaluate.run(str(ckpt), str(snapshot), out=str(tmp_path / "jx"), batch_size=4, loaded=loaded,
                          judge=str(jax_judge), judge_temperature=0.0, progress=False)
    assert greedy["subsets"] == summary["subsets"]


def test_judge_prompt_and_reply_rule():
    text = judge_lib.judge_text("A. x\nB. y", "It is B.")
    assert text == ("<|im_start|>user\n\nextract the choice of A, B, C, D from the following answer.\n"
                    "If the answer is not clear, return \"None\", otherwise just return the single choice letter.\n"
                    "options: A. x\nB. y\n answer: \nIt is B.\n\n<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert [judge_lib.read_letter(r, 4) for r in ("B", " C\n", "<think>\n\n</think>\n\nD", "None", "B.", "E")] == [
        1, 2, 3, None, None, None]
    assert judge_lib.item_seed(0, "gtzan/1:ab") == judge_lib.item_seed(0, "gtzan/1:ab") != judge_lib.item_seed(1, "gtzan/1:ab")


def test_loglik_skips_items_whose_option_texts_are_hidden(mucue):
    root, snapshot, ckpt, loaded = mucue
    items = benchmarks.read_benchmark(snapshot)
    hidden = next(it for it in items if not all(it.choices))
    mels, error = evaluate.prepare_item(loaded, hidden, "loglik")
    assert mels is None and "cannot split choices_text" in error
    assert evaluate.prepare_item(loaded, hidden, "generate")[1] is None


def test_published_table_is_the_papers():
    """The per-subset figures average to the paper's AVG (26 subsets, one decimal)."""
    for model, avg in report.PUBLISHED_AVG.items():
        figures = report.PUBLISHED[model]
        assert len(figures) == 26
        assert round(sum(figures.values()) / 26, 1) == avg, model
    full = report.published_beside(["GTZAN", "mmau-music"] + [s for s in report.PUBLISHED["MuFun"]][2:])
    assert full["models"]["Kimi-Audio"]["paper_avg_26"] == 49.9
    assert report.published_beside(["genre", "tempo"]) == {}


# ------------------------------------------------------------------------------ processes and resume

def test_interrupted_run_resumed_on_two_processes_equals_an_uninterrupted_run(mucue, tmp_path):
    root, snapshot, ckpt, loaded = mucue
    whole = evaluate.run(str(ckpt), str(snapshot), out=str(tmp_path / "whole"), batch_size=2, loaded=loaded,
                         progress=False)
    out = tmp_path / "resumed"
    with pytest.raises(evaluate.Interrupted):
        evaluate.run(str(ckpt), str(snapshot), out=str(out), batch_size=2, loaded=loaded, progress=False,
                     stop=lambda: True)  # SIGTERM after the first batch
    first = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(first) == 2
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(REPO / "launch" / "local.py"), "-n", "2", "--", sys.executable, "-m", "jaxmusic.cli",
           "eval", str(ckpt), "--benchmark", str(snapshot), "--out", str(out), "--batch-size", "2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "overall (micro)" in r.stdout  # process 0 waits for process 1, then prints the table
    rescored = [json.loads(line)["key"] for p in (0, 1) for line in
                (out / f"items.process{p}.jsonl").read_text().splitlines()]
    kept = {rec["key"] for rec in first if rec["status"] != "skipped"}
    assert kept and not kept & set(rescored)  # nothing already scored was scored again
    assert len(rescored) == len(set(rescored)) == len(ROWS) - len(kept)  # each missing item once
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["subsets"] == whole["subsets"] and resumed["overall"] == whole["overall"]
    statuses = {json.loads(line)["key"]: json.loads(line)["status"] for line in
                (out / "items.jsonl").read_text().splitlines()}
    assert statuses == {json.loads(line)["key"]: json.loads(line)["status"] for line in
                        (tmp_path / "whole" / "items.jsonl").read_text().splitlines()}


def test_sigterm_stops_after_the_batch_with_75_and_a_rerun_finishes(mucue, tmp_path):
    root, snapshot, ckpt, _ = mucue
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jaxmusic.cli", "eval", str(ckpt), "--benchmark", str(snapshot), "--out", str(out),
           "--batch-size", "1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "items.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == evaluate.EXIT_PREEMPTED, err
    assert "(SIGTERM); rerun the same command to resume" in err
    assert len(log.read_text().splitlines()) < len(ROWS) and not (out / "results.json").exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["overall"]["items"] == len(ROWS)


def test_slurm_script_runs_eval():
    env = dict(os.environ, DRY_RUN="1", JAXMUSIC_PLATFORM="cpu")
    r = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "eval", "ckpt", "--benchmark", "MuCUE",
                        "--out", "runs/mucue"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == ("srun --kill-on-bad-exit=1 jaxmusic eval ckpt --benchmark MuCUE "
                                                 "--out runs/mucue")
