"""`jaxmusic eval`: answer extraction, benchmark parsing, and exact scores of a model forced to one answer.

The model is a real MuFun in the released layout (torch Whisper + Qwen3 + connector), imported
with `convert/hf_to_jax.py --mufun`, whose LLM is wired as a bigram machine (`forced_model`):
after the prompt it always answers "blues" then `<|im_end|>` (both when generating and when an
option is scored), whatever the audio. The expected accuracy of any benchmark is then known.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from forced_model import FORCED, GENRES, forced_mufun_checkpoint, write_audio

from jaxmusic import inference, templates
from jaxmusic.evaluation import evaluate
from jaxmusic.errors import UserError
from jaxmusic.evaluation.evaluate import extract_choice
from jaxmusic.templates import mucue_prompt
from jaxmusic.demo.tokenizer import train_tokenizer



# ------------------------------------------------------------------------------- extraction

CHOICES = ["C major", "A major", "E minor", "F major"]


@pytest.mark.parametrize("output, expected", [
    ("B", 1), ("(b)", 1), (" C. ", 2), ("[D]", 3),
    ("Answer: B", 1), ("The answer is (C).", 2), ("I choose option D", 3), ("answer:A", 0),
    ("B. A major", 1), ("(B) A major", 1), ("D) F major", 3), ("It must be (C).", 2),
    ("A major", 1), ("a major.", 1), ("The key is E minor.", 2),
    ("the answer is A major", 1),           # "A" starts an option's text: not a letter
    ("(B) A major, not (A) C major", None), # two letters
    ("B. A major, surely", 1),              # the letter's option is the one mentioned
    ("C major or A major", None),           # two options mentioned
    ("B. E minor", None),                   # the letter and the mentioned option disagree
    ("(A) or (B)", None), ("", None), ("no idea", None), ("E", None), ("G major", None),
])
def test_extract_choice(output, expected):
    assert extract_choice(output, CHOICES) == expected


def test_extract_choice_prefers_longest_option_and_refuses_letter_text_clash():
    tempo = ["slow", "moderate", "fast", "very fast"]
    assert extract_choice("very fast", tempo) == 3
    assert extract_choice("It is very fast, about 180 BPM.", tempo) == 3
    assert extract_choice("fast", tempo) == 2
    assert extract_choice("slow or fast", tempo) is None
    # "B" is both the letter of option 1 and the text of option 0: never guess
    assert extract_choice("B", ["B", "C", "D", "E"]) is None
    assert extract_choice("B", ["A", "B", "C", "D"]) == 1  # both readings agree


def test_prompt_is_mucue_exact():
    assert mucue_prompt("Which key?", ["C major", "A minor"]) == (
        "Choose the correct option for the question based on the audio. Which key? A. C major\nB. A minor")


# ------------------------------------------------------------------------------- benchmark file

def test_read_benchmark_answer_forms_and_errors(tmp_path):
    rows = [{"audio": "x.wav", "question": "q", "choices": GENRES, "answer": "c"},
            {"audio": ["x.wav", "y.wav"], "time": [None, [1, 2]], "question": "q", "choices": GENRES, "answer": 3},
            {"audio": "x.wav", "time": [0, 5], "question": "q", "choices": {"A": "x", "B": "y"}, "answer": "y",
             "subset": "tempo", "id": "k"}]
    path = tmp_path / "b.json"
    path.write_text(json.dumps(rows))
    items = evaluate.read_benchmark(path)
    assert [it.answer for it in items] == [2, 3, 1]
    assert items[1].segments == (None, (1.0, 2.0)) and items[2].segments == ((0.0, 5.0),)
    assert items[0].audio == (str(tmp_path / "x.wav"),) and items[2].subset == "tempo" and items[0].subset == "default"
    assert len(evaluate.read_benchmark(path, limit=2)) == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[0], "answer": "rap"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: .*'rap'"):
        evaluate.read_benchmark(bad)
    bad.write_text(json.dumps({**rows[1], "question": "<audio> q"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: .*1 <audio> tags for 2 audio files"):
        evaluate.read_benchmark(bad)
    bad.write_text('{"question": "q"\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: not valid JSON"):
        evaluate.read_benchmark(bad)


# ------------------------------------------------------------------------------- forced model

def _items():
    """(benchmark item, expected status in generate mode); audio files written by `write_audio`."""
    return [
        ({"id": "a", "audio": "tone.wav", "question": "Genre?", "choices": GENRES, "answer": "A",
          "subset": "genre"}, "correct"),
        ({"id": "b", "audio": "long.flac", "question": "Genre?", "choices": ["jazz", "blues", "rock", "pop"],
          "answer": 1, "subset": "genre"}, "correct"),
        ({"id": "c", "audio": "tone.wav", "time": [0.5, 2.0], "question": "Style?",
          "choices": ["jazz", "rock", "blues", "pop"], "answer": "rock", "subset": "mood"}, "wrong"),
        ({"id": "d", "audio": "tone.wav", "question": "Genre?", "choices": ["jazz", "rock", "pop", "metal"],
          "answer": "D", "subset": "mood"}, "unparsed"),
        ({"id": "e", "audio": "broken.wav", "question": "Genre?", "choices": GENRES, "answer": "A",
          "subset": "mood"}, "skipped"),
        ({"id": "f", "audio": "tone.wav", "time": [5, 9], "question": "Genre?", "choices": GENRES, "answer": "A",
          "subset": "genre"}, "skipped"),
        ({"id": "g", "audio": ["tone.wav", "long.flac"], "question": "<audio> then <audio>: genre?",
          "choices": ["pop", "blues"], "answer": "blues", "subset": "genre"}, "correct"),
        ({"id": "h", "audio": "missing.ogg", "question": "Genre?", "choices": GENRES, "answer": "A",
          "subset": "mood"}, "skipped"),
    ]


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_audio(root)
    items = _items()
    texts = [templates.SYSTEM, "USER: ASSISTANT: " + FORCED + " " + " ".join(GENRES + ["metal"])]
    texts += [mucue_prompt(it["question"], it["choices"]) for it, _ in items]
    tok = train_tokenizer(texts, vocab_size=300)
    ckpt = forced_mufun_checkpoint(root, tok)
    bench = root / "bench.jsonl"
    bench.write_text("".join(json.dumps(it) + "\n" for it, _ in items))
    return root, ckpt, bench, inference.load(ckpt)


def _statuses(out: Path) -> dict[str, str]:
    return {r["id"]: r["status"] for r in map(json.loads, (out / "items.jsonl").read_text().splitlines())}


def test_generate_scores_exactly_the_forced_answers(forced, tmp_path):
    root, ckpt, bench, loaded = forced
    summary = evaluate.run(str(ckpt), str(bench), mode="generate", out=str(tmp_path), batch_size=4,
                           loaded=loaded, progress=False)
    expected = {it["id"]: status for it, status in _items()}
    assert _statuses(tmp_path) == expected
    outputs = [r.get("output") for r in map(json.loads, (tmp_path / "items.jsonl").read_text().splitlines())]
    assert set(outputs) == {FORCED, None}  # the model really is forced
    o = summary["overall"]
    assert (o["items"], o["scored"], o["correct"], o["wrong"], o["unparsed"], o["skipped"]) == (8, 5, 3, 1, 1, 3)
    assert o["accuracy"] == 3 / 5
    g, m = summary["subsets"]["genre"], summary["subsets"]["mood"]
    assert (g["accuracy"], g["skipped"], m["accuracy"], m["unparsed"]) == (1.0, 1, 0.0, 1)
    assert g["chance"] == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    assert o["macro"] == 0.5
    skipped = {s["id"]: s["error"] for s in summary["skipped_items"]}
    assert set(skipped) == {"e", "f", "h"}
    assert "broken.wav" in skipped["e"] and "start is at or beyond" in skipped["f"] and "missing.ogg" in skipped["h"]
    assert json.loads((tmp_path / "results.json").read_text())["overall"]["accuracy"] == 3 / 5
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_loglik_picks_the_forced_option_and_matches_score(forced, tmp_path):
    root, ckpt, bench, loaded = forced
    with_forced = root / "with_forced.jsonl"
    with_forced.write_text("".join(json.dumps(it) + "\n" for it, _ in _items() if FORCED in it["choices"]))
    summary = evaluate.run(str(ckpt), str(with_forced), mode="loglik", out=str(tmp_path), batch_size=4,
                           loaded=loaded, progress=False)
    assert _statuses(tmp_path) == {it["id"]: s for it, s in _items() if FORCED in it["choices"]}
    assert summary["overall"]["accuracy"] == 3 / 4
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "items.jsonl").read_text().splitlines())}
    # each item's audio is encoded once and shared by its option rows: the totals must equal
    # `jaxmusic score`, which lays every option out with its own copy of the audio. Checked on
    # item g (a 1-chunk and a 3-chunk file, in a batch after other items: offsets to get right).
    item = next(it for it, _ in _items() if it["id"] == "g")
    request = inference.Request(mucue_prompt(item["question"], item["choices"]),
                                tuple(str(root / a) for a in item["audio"]))
    reference = [s.total for s in inference.score(loaded, request, item["choices"])]
    np.testing.assert_allclose(records["g"]["scores"], reference, atol=1e-4)  # reached: 0 (same float32 math)
    assert max(records["g"]["scores"]) > -1e-3  # the forced option is certain


def test_resume_does_not_redo_items(forced, tmp_path, monkeypatch):
    root, ckpt, bench, loaded = forced
    seen = []
    real = evaluate._generate

    def spy(loaded_, items, mels, batch_size):
        seen.extend(it.id for it in items)
        return real(loaded_, items, mels, batch_size)

    monkeypatch.setattr(evaluate, "_generate", spy)
    run = dict(mode="generate", out=str(tmp_path), batch_size=4, loaded=loaded, progress=False)
    evaluate.run(str(ckpt), str(bench), limit=3, **run)
    assert seen == ["a", "b", "c"]
    with open(tmp_path / "items.jsonl", "a") as f:
        f.write('{"key": "4:torn')  # a run killed mid-write
    seen.clear()
    summary = evaluate.run(str(ckpt), str(bench), **run)
    assert seen == ["d", "g"]  # e, f, h fail to decode and never reach the model
    assert summary["overall"]["accuracy"] == 3 / 5
    seen.clear()
    evaluate.run(str(ckpt), str(bench), **run)
    assert seen == []
    with pytest.raises(UserError, match="another run"):
        evaluate.run(str(ckpt), str(bench), **{**run, "mode": "loglik"})


def test_main_cli(forced, tmp_path, capsys):
    root, ckpt, bench, _ = forced
    out = tmp_path / "cli"
    assert evaluate.main([str(ckpt), "--benchmark", str(bench), "--out", str(out), "--limit", "4",
                          "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "genre" in printed and "results.json" in printed
    assert json.loads((out / "results.json").read_text())["overall"]["items"] == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "x.wav", "question": "q", "choices": ["a"], "answer": 0}\n')
    assert evaluate.main([str(ckpt), "--benchmark", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1" in err[0]


def test_item_longer_than_the_largest_bucket_is_skipped(forced):
    root, ckpt, bench, loaded = forced
    short = dataclasses.replace(loaded, cfg=dataclasses.replace(loaded.cfg, length_buckets=(128,)))
    item_b = evaluate.read_benchmark(bench)[1]  # 3 chunks = 90 audio tokens, plus the prompt
    mels, error = evaluate.prepare_item(short, item_b, "generate")
    assert mels is None and "exceed the largest length bucket 128" in error
    assert evaluate.prepare_item(loaded, item_b, "generate")[1] is None


def test_compare_cli_one_table_and_chart(forced, tmp_path, capsys):
    root, ckpt, bench, _ = forced
    out = tmp_path / "cmp"
    assert evaluate.main([str(ckpt), "--compare", str(ckpt), "--benchmark", str(bench), "--out", str(out),
                          "--limit", "4", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    labels = [evaluate.model_label(i, str(ckpt)) for i in (0, 1)]
    assert all(label in printed for label in labels) and "+0.0 +- 0.0" in printed
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["models"] == labels and cmp["subsets"]["genre"]["diff"][labels[1]] == 0.0
    assert (out / "compare.png").stat().st_size > 1000 and (out / labels[1] / "results.json").is_file()
