"""Data pipeline: manifests, bad data, determinism across workers and hosts, exact resume."""

import collections
import json
import logging

import numpy as np
import pytest
import soundfile
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from jaxmusic import audio as A
from jaxmusic import templates as T
from jaxmusic.data import manifest as M
from jaxmusic.data import pipeline as P
from jaxmusic.configs import ConfigError
from jaxmusic.data.config import DataConfig
from jaxmusic.data.examples import ExampleBuilder, is_skip

SR = 16000
TPC = 300  # MuFun's audio tokens per 30 s chunk
RUN = dict(batch_size=2, tokens_per_chunk=TPC, process_index=0, process_count=1)  # make_dataset's run arguments


def make_tokenizer():
    """A small byte-level BPE like Qwen's, with <|im_end|> as a special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([T.SYSTEM, "USER: What genre is this song? ASSISTANT: blues rock",
                             "Describe the tempo and the instruments of sample number 12."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def tone(seconds: float, sr: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 900) * t)
            + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def conv(question: str, answer: str, turns: int = 1):
    msgs = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    for k in range(1, turns):
        msgs += [{"from": "human", "value": f"And turn {k}?"}, {"from": "gpt", "value": f"answer {k}"}]
    return msgs


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An audio folder, a clean manifest (JSONL) and the same records as a JSON list."""
    root = tmp_path_factory.mktemp("data")
    audio = root / "audio"
    audio.mkdir()
    soundfile.write(audio / "a.wav", tone(2.0, SR, 0), SR)
    soundfile.write(audio / "b.flac", tone(3.0, 22050, 1), 22050)
    soundfile.write(audio / "c.wav", tone(0.5, SR, 2), SR)
    soundfile.write(audio / "d.ogg", tone(1.5, 44100, 3), 44100, format="OGG", subtype="VORBIS")
    soundfile.write(audio / "long.wav", tone(31.0, SR, 4), SR)  # 2 chunks (the last 1 s > 0.5 s)
    files = ["a.wav", "b.flac", "c.wav", "d.ogg", "long.wav"]
    records = []
    for i in range(14):
        rec = {"id": f"s{i}", "audio": files[i % 5],
               "conversations": conv(f"<audio>\nWhat genre is sample {i}?", f"blues rock {i}", 1 + i % 2)}
        if i % 4 == 1:
            rec["audio"] = [files[i % 5], files[(i + 2) % 5]]
            rec["conversations"][0]["value"] += " Compare with <audio> please."
        if i % 5 == 2:
            rec["time"] = [0.1, 0.4]
        records.append(rec)
    jsonl = root / "clean.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    listed = root / "clean.json"
    listed.write_text(json.dumps(records, indent=2))
    return {"root": root, "audio": audio, "records": records, "jsonl": jsonl, "json": listed}


def cfg_for(data, manifests=None, weights=None, **kw):
    manifests = manifests or [data["jsonl"]]
    mixture = [{"manifest": m, "weight": w} for m, w in zip(manifests, weights or [None] * len(manifests))]
    base = dict(mixture=mixture, audio_root=str(data["audio"]), seq_len=1024, chunks_per_row=3,
                features="waveform", seed=7, workers=0, prefetch_batches=0)
    return DataConfig(**{**base, **kw})


def batches_of(cfg, tok, **kw):
    return iter(P.make_dataset(cfg, tok, **{**RUN, **kw}))


def run(cfg, tok, **kw):
    it = batches_of(cfg, tok, **kw)
    batches = list(it)
    state = it.get_state()
    it.close()
    return batches, state


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------ manifests

def test_json_list_and_jsonl_index_the_same_records(data):
    jl, js = M.ManifestSource(data["jsonl"]), M.ManifestSource(data["json"])
    assert len(jl) == len(js) == len(data["records"])
    for i, rec in enumerate(data["records"]):
        assert json.loads(jl[i].text) == json.loads(js[i].text) == rec
        assert jl[i].line == i + 1
    # the indented list: element i starts on the line after its predecessor's closing brace
    text = data["json"].read_text().splitlines()
    assert all(text[js[i].line - 1].strip() == "{" for i in range(len(js)))


def test_broken_list_and_non_json_fail_at_startup(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"id": 1},\n{"id": 2,,}\n]')
    with pytest.raises(M.ManifestError, match=r"bad.json: not a valid JSON list at line 3"):
        M.ManifestSource(bad)
    other = tmp_path / "x.txt"
    other.write_text("hello")
    with pytest.raises(M.ManifestError, match="neither a JSON list nor JSONL"):
        M.ManifestSource(other)
    with pytest.raises(M.ManifestError, match="manifest not found"):
        M.ManifestSource(tmp_path / "missing.jsonl")


def test_time_crops_one_pair_or_one_per_file():
    def parse(obj):
        return M.parse_record(M.RawRecord("m", 1, json.dumps(obj).encode()))

    c = conv("<audio><audio>", "x")
    assert parse({"audio": ["a", "b"], "time": [1, 2], "conversations": c}).crops == ((1.0, 2.0),) * 2
    assert parse({"audio": ["a", "b"], "time": [[1, 2], None], "conversations": c}).crops == ((1.0, 2.0), None)
    assert parse({"conversations": conv("hi", "x")}).audio == ()  # text-only sample
    for bad in ({"audio": ["a", "b"], "time": [[1, 2]], "conversations": c},
                {"audio": "a", "time": "0-3", "conversations": c}, {"audio": 3, "conversations": c}):
        with pytest.raises(M.BadSample) as e:
            parse(bad)
        assert e.value.reason == "bad_record"


# ------------------------------------------------------------------------------ examples

def test_example_matches_front_end_and_template(data, tok):
    cfg = DataConfig(audio_root=str(data["audio"]), seq_len=1024, chunks_per_row=3, features="log_mel")
    raw = M.ManifestSource(data["jsonl"])[1]  # two files: b.flac and d.ogg
    ex = ExampleBuilder(cfg, tok, tokens_per_chunk=TPC)(raw)
    rec = data["records"][1]
    want_text = T.encode_conversation("qwen2_instruct", rec["conversations"], 2, tok)
    for got, want in zip(ex["pieces"], want_text.pieces):
        np.testing.assert_array_equal(got, want)
    for got, name in zip(ex["audio"], rec["audio"]):
        want = A.log_mel_np(A.chunk_waveform(A.load_audio(data["audio"] / name)))
        np.testing.assert_array_equal(got, want)
    assert ex["length"] == sum(len(p) for p in ex["pieces"]) + 2 * TPC
    assert ex["where"] == f"{data['jsonl']}:2"


def test_text_is_truncated_only_after_the_audio(data, tok):
    long_answer = " ".join(f"word{i}" for i in range(400))
    rec = {"audio": "long.wav", "conversations": conv("<audio>\nDescribe it.", long_answer)}
    cfg = DataConfig(audio_root=str(data["audio"]), seq_len=800, chunks_per_row=3)
    ex = ExampleBuilder(cfg, tok, tokens_per_chunk=TPC, with_audio=False)(M.RawRecord("m", 1, json.dumps(rec).encode()))
    assert ex["truncated"] and ex["length"] == 800
    full = T.encode_conversation("qwen2_instruct", rec["conversations"], 1, tok)
    np.testing.assert_array_equal(ex["pieces"][0], full.pieces[0])  # text before the audio is whole
    np.testing.assert_array_equal(ex["pieces"][1], full.pieces[1][: 800 - 600 - len(full.pieces[0])])
    # the audio alone (600 tokens + prompt) past the budget: dropped, never cut
    small = DataConfig(audio_root=str(data["audio"]), seq_len=600, chunks_per_row=3)
    skip = ExampleBuilder(small, tok, tokens_per_chunk=TPC, with_audio=False)(M.RawRecord("m", 1, json.dumps(rec).encode()))
    assert skip["skip"] == "audio_exceeds_budget"


def test_prompts_are_cut_only_from_the_left_or_skipped(data, tok):
    """Reinforcement-learning prompts (`prompt_tokens`): text beyond the limit is cut from the left
    (TRL's rule); one whose cut would reach the audio, or that overflows seq_len (its end is what
    the completion follows), is skipped as prompt_exceeds_budget."""
    question = "<audio>\n" + " ".join(f"question{i}" for i in range(50))
    raw = M.RawRecord("m", 1, json.dumps({"audio": "a.wav", "conversations": conv(question, "x")}).encode())
    cfg = DataConfig(audio_root=str(data["audio"]), seq_len=800, chunks_per_row=1)
    whole = ExampleBuilder(cfg, tok, tokens_per_chunk=TPC, with_audio=False, prompt_tokens=512)(raw)
    assert not is_skip(whole) and whole["answer"] == "x"
    short = ExampleBuilder(cfg, tok, tokens_per_chunk=TPC, with_audio=False, prompt_tokens=16)(raw)
    assert short["skip"] == "prompt_exceeds_budget"
    tight = DataConfig(audio_root=str(data["audio"]), seq_len=whole["length"] - 1, chunks_per_row=1)
    assert ExampleBuilder(tight, tok, tokens_per_chunk=TPC, with_audio=False, prompt_tokens=512)(raw)["skip"] \
        == "prompt_exceeds_budget"


def test_max_audio_seconds_crops_before_chunking(data, tok):
    rec = {"audio": "long.wav", "conversations": conv("<audio>\nDescribe it.", "calm")}
    raw = M.RawRecord("m", 1, json.dumps(rec).encode())
    whole = ExampleBuilder(DataConfig(audio_root=str(data["audio"]), features="waveform",
                                      max_audio_seconds=None), tok, tokens_per_chunk=TPC)(raw)
    cut = ExampleBuilder(DataConfig(audio_root=str(data["audio"]), features="waveform",
                                    max_audio_seconds=30.0), tok, tokens_per_chunk=TPC)(raw)
    assert list(whole["chunks"]) == [2] and list(cut["chunks"]) == [1]
    np.testing.assert_array_equal(cut["audio"][0], whole["audio"][0][: 30 * SR])


# ------------------------------------------------------------------------------ bad data

@pytest.fixture(scope="module")
def salted(data):
    """The clean records with one record of every bad kind mixed in."""
    audio = data["audio"]
    soundfile.write(audio / "empty.wav", np.zeros(0, np.float32), SR)
    nan = tone(1.0, SR, 5)
    nan[100] = np.nan
    soundfile.write(audio / "nan.wav", nan, SR, subtype="FLOAT")
    (audio / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    whole = (audio / "a.wav").read_bytes()
    (audio / "trunc.wav").write_bytes(whole[: len(whole) // 2])
    ok = conv("<audio>\nWhat is it?", "music")
    long_question = "<audio>\n" + " ".join(f"question{i}" for i in range(300))
    bad = {
        "malformed_json": '{"id": "broken", "audio": "a.wav", ',
        "bad_record": json.dumps({"id": "b1", "audio": "a.wav"}),
        "bad_conversation": json.dumps({"audio": "a.wav", "conversations": [
            {"from": "human", "value": "<audio>"}, {"from": "human", "value": "again"}]}),
        "tag_mismatch": json.dumps({"audio": "a.wav", "conversations": conv("<audio><audio>", "x")}),
        "missing_audio": json.dumps({"audio": "nope.wav", "conversations": ok}),
        "unreadable_audio": json.dumps({"audio": "garbage.wav", "conversations": ok}),
        "empty_audio": json.dumps({"audio": "empty.wav", "conversations": ok}),
        "nonfinite_audio": json.dumps({"audio": "nan.wav", "conversations": ok}),
        "truncated_audio": json.dumps({"audio": "trunc.wav", "conversations": ok}),
        "bad_crop": json.dumps({"audio": "a.wav", "time": [10, 12], "conversations": ok}),
        "audio_exceeds_budget": json.dumps({"audio": ["long.wav", "long.wav"],
                                            "conversations": conv("<audio><audio>", "x")}),
        "no_answer_within_budget": json.dumps({"audio": "long.wav",
                                               "conversations": conv(long_question, "x")}),
    }
    # prompt_exceeds_budget: reinforcement-learning prompts only (test_prompts_are_cut_only_from_the_left_or_skipped)
    assert set(bad) == set(M.SKIP_REASONS) - {"prompt_exceeds_budget"}
    lines = [json.dumps(r) for r in data["records"]]
    for k, (reason, line) in enumerate(bad.items()):
        lines.insert(2 * k + 1, line)
    path = data["root"] / "salted.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, bad, lines


def test_every_bad_kind_is_skipped_counted_and_reported(data, tok, salted, tmp_path, caplog):
    path, bad, lines = salted
    report = tmp_path / "report.json"
    cfg = cfg_for(data, [path], prefetch_batches=2)
    with caplog.at_level(logging.WARNING, logger="jaxmusic.data"):
        batches, state = run(cfg, tok, report_path=str(report))
    assert state["skipped"] == {reason: 1 for reason in bad}
    assert state["examples"] == len(data["records"])
    # one warning line per skip, naming file:line and the reason, and a summary at the end
    messages = [r.getMessage() for r in caplog.records if r.name == "jaxmusic.data"]
    warnings = [m for m in messages if m.startswith("skipping ")]
    assert len(warnings) == len(bad)
    summary = [m for m in messages if m.startswith("data: ")]
    assert len(summary) == 1 and all(f"skipped {reason}: 1" in summary[0] for reason in bad)
    for reason, line in bad.items():
        where = f"{path}:{lines.index(line) + 1}: {reason}:"
        assert sum(where in w for w in warnings) == 1, reason
        assert all("\n" not in w for w in warnings)
    written = json.loads(report.read_text())
    assert written["skipped"] == state["skipped"] and written["skipped_total"] == len(bad)
    assert written["examples"] == len(data["records"])
    assert "skipped tag_mismatch: 1" in P.format_report(written)
    # exactly the clean examples were batched: same batches as from the clean manifest, in the
    # salted stream's order -> compare the multiset of real tokens instead
    clean, _ = run(cfg_for(data, [data["jsonl"]]), tok)
    def tokens(bs):
        return sorted(int(t) for b in bs for t in b["input_ids"][b["segment_ids"] > 0])
    assert tokens(batches) == tokens(clean)


def test_strict_mode_fails_on_the_first_bad_record(data, tok, salted):
    path, bad, lines = salted
    cfg = cfg_for(data, [path], strict=True, shuffle=False, prefetch_batches=2)
    first_bad = next(i for i, line in enumerate(lines) if line in bad.values())
    reason = next(r for r, line in bad.items() if line == lines[first_bad])
    with pytest.raises(P.DataError, match=rf"salted.jsonl:{first_bad + 1}: {reason}: .*strict mode"):
        run(cfg, tok)


def test_audio_error_classification_matches_load_audio(data, salted):
    # The skip reasons read load_audio's messages; a reworded message must fail here.
    from jaxmusic.data.examples import load_checked

    cases = {"nope.wav": "missing_audio", "garbage.wav": "unreadable_audio", "empty.wav": "empty_audio",
             "nan.wav": "nonfinite_audio", "trunc.wav": "truncated_audio"}
    for name, reason in cases.items():
        with pytest.raises(M.BadSample) as e:
            load_checked(str(data["audio"] / name), None)
        assert e.value.reason == reason
    with pytest.raises(M.BadSample) as e:
        load_checked(str(data["audio"] / "a.wav"), (-1.0, 1.0))
    assert e.value.reason == "bad_crop"


# ------------------------------------------------------------------ determinism, sharding, resume

def test_same_seed_same_batches_different_seed_different_order(data, tok):
    a, _ = run(cfg_for(data), tok)
    b, _ = run(cfg_for(data, prefetch_batches=2, read_threads=2), tok)
    assert_same_batches(a, b)
    c, _ = run(cfg_for(data, seed=8), tok)
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    # fixed shapes from the config
    assert len(a) == 7 and all(x["input_ids"].shape == (2, 1024) for x in a)
    assert all(x["wave"].shape == (2 * 3, A.CHUNK_SAMPLES) for x in a)


def test_process_shards_partition_the_records(data, tok):
    whole = [r.where for r in P.record_dataset(cfg_for(data, [data["jsonl"], data["json"]]), num_epochs=2)]
    assert len(whole) == 2 * 28 and len(set(whole)) == 28  # the union: every record exactly num_epochs times
    # a weighted mixture: the hosts' shards add up to the one-process stream
    mix = cfg_for(data, [data["jsonl"], data["json"]], weights=(1.0, 3.0))
    shards = [run(mix, tok, process_index=i, process_count=3)[0] for i in range(3)]
    assert sorted(sum((_samples(b) for b in shards), [])) == sorted(_samples(run(mix, tok)[0]))
    # through the whole pipeline: the two hosts' examples add up to the records, none twice
    cfg = cfg_for(data)
    runs = [run(cfg, tok, process_index=i, process_count=2) for i in range(2)]
    assert [s["examples"] for _, s in runs] == [7, 7]
    assert sorted(sum((_samples(b) for b, _ in runs), [])) == sorted(_samples(run(cfg, tok)[0]))
    last = runs[0][0][-1]  # 7 examples in rows of 2: the last batch has one padding row
    assert last["input_ids"].shape == (2, 1024) and not last["segment_ids"][1].any()
    assert (last["labels"][1] == -100).all() and not last["chunk_mask"][3:].any()


def test_weighted_mixture_follows_the_weights(data, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps(r) for r in data["records"][:4]) + "\n")
    cfg = cfg_for(data, [data["jsonl"], other], weights=(1.0, 3.0))
    stream = [r.manifest for r in P.record_dataset(cfg, num_epochs=5)]
    assert len(stream) == 5 * 18
    share = stream.count(str(other)) / len(stream)
    assert abs(share - 0.75) < 0.02  # reached: 0.75


def test_resume_reproduces_the_remaining_batches(data, tok):
    for packing in (False, True):
        cfg = cfg_for(data, packing=packing, prefetch_batches=2, seq_len=2048, chunks_per_row=4)
        full, _ = run(cfg, tok, num_epochs=2)
        it = batches_of(cfg, tok, num_epochs=2)
        head = [next(it) for _ in range(3)]
        state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
        it.close()
        if packing:
            assert state["pending"], "the test should cover examples deferred across the cut"
        restored = batches_of(cfg, tok, num_epochs=2)
        restored.set_state(state)
        tail = list(restored)
        restored.close()
        assert_same_batches(head + tail, full)


def test_two_workers_match_in_process_and_resume_across_worker_counts(data, tok, salted):
    path = salted[0]
    cfg0 = cfg_for(data, [path], packing=True)
    ref, ref_state = run(cfg0, tok)
    cfg2 = cfg_for(data, [path], packing=True, workers=2)
    it = batches_of(cfg2, tok)
    it.start_prefetch()  # workers start before the first batch is asked for
    got = [next(it) for _ in range(2)]
    state = it.get_state()
    it.close()
    # resume the 2-worker run without workers: the state does not depend on the worker count
    it0 = batches_of(cfg0, tok)
    it0.set_state(state)
    got += list(it0)
    final = it0.get_state()
    it0.close()
    assert_same_batches(got, ref)
    assert final == ref_state


def _samples(batches):
    """Every sample of every row, as (ids, labels, positions, audio bytes) of its segment."""
    out = []
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            for s in range(1, b["segment_ids"][r].max() + 1):
                at = b["segment_ids"][r] == s
                slots = np.unique(b["audio_index"][r][at & b["is_audio"][r]] // TPC)
                wave = b["wave"].reshape(len(b["input_ids"]), -1, A.CHUNK_SAMPLES)[r]
                out.append((b["input_ids"][r][at].tobytes(), b["labels"][r][at].tobytes(),
                            b["positions"][r][at].tobytes(), wave[slots].tobytes()))
    return out


def test_packing_keeps_every_example_in_fewer_rows(data, tok):
    plain, _ = run(cfg_for(data, seq_len=2048, chunks_per_row=4), tok)
    packed, state = run(cfg_for(data, seq_len=2048, chunks_per_row=4, packing=True), tok)
    assert sorted(_samples(plain)) == sorted(_samples(packed))
    assert len(_samples(packed)) == len(data["records"]) == state["examples"]
    assert len(packed) < len(plain)
    for b in packed:
        assert (b["segment_ids"].max(axis=1) >= 1).sum() >= 1
        assert b["chunk_mask"].reshape(2, 4).sum(axis=1).max() <= 4


def test_log_mel_batches(data, tok):
    cfg = cfg_for(data, features="log_mel", shuffle=False)
    it = batches_of(cfg, tok)
    batch = next(it)
    it.close()
    assert batch["mel"].shape == (2 * 3, 128, 3000) and batch["mel"].dtype == np.float32
    first = A.log_mel_np(A.chunk_waveform(A.load_audio(data["audio"] / data["records"][0]["audio"])))
    np.testing.assert_array_equal(batch["mel"][: len(first)], first)
    assert batch["chunk_mask"][:3].sum() == len(first) and not batch["mel"][len(first):3].any()


def test_config_errors_name_the_key_and_the_encoder_input_comes_from_the_model(data, tok):
    with pytest.raises(ConfigError, match=r"data.features: 'mel' is not one of"):
        DataConfig(features="mel")
    with pytest.raises(ConfigError, match="give every manifest a weight, or none"):
        DataConfig(mixture=[{"manifest": "a.jsonl", "weight": 1}, {"manifest": "b.jsonl"}])
    with pytest.raises(ConfigError, match=r"data.mixture: a list of \{manifest"):
        P.make_dataset(DataConfig(), tok, **RUN)
    # 30 s chunks make 3000 frames; any number of mel bins (waveforms become the encoder's in the step)
    with pytest.raises(ConfigError, match="3000 log-mel frames; this encoder takes 60"):
        P.make_dataset(cfg_for(data), tok, **RUN, mel_shape=(16, 60))
    it = batches_of(cfg_for(data, features="log_mel", shuffle=False), tok, mel_shape=(80, 3000))
    batch = next(it)
    it.close()
    assert batch["mel"].shape == (2 * 3, 80, 3000)
    first = A.log_mel_np(A.chunk_waveform(A.load_audio(data["audio"] / data["records"][0]["audio"])), 80)
    np.testing.assert_array_equal(batch["mel"][: len(first)], first)


def test_data_check_reports_every_manifest(data, tok, salted, tmp_path, capsys):
    from jaxmusic.data import check

    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    report = tmp_path / "check.json"
    argv = [str(salted[0]), str(data["json"]), "--audio-root", str(data["audio"]), "--seq-len", "1024",
            "--max-chunks", "3", "--batch-size", "2", "--workers", "1", "--tokenizer", str(tok_dir),
            "--report", str(report)]
    assert check.main(argv) == 1  # the salted manifest holds bad data
    out = capsys.readouterr().out
    salted_stats, clean_stats = json.loads(report.read_text())
    assert salted_stats["skipped"] == {r: 1 for r in M.SKIP_REASONS if r != "prompt_exceeds_budget"}
    assert salted_stats["usable"] == clean_stats["usable"] == len(data["records"])
    assert clean_stats["skipped"] == {} and clean_stats["bad_data"] == 0
    assert sum(clean_stats["chunk_histogram"].values()) == len(data["records"])
    assert clean_stats["chunk_histogram"]["3"] == 1  # long.wav (2 chunks) + b.flac
    p = clean_stats["padding_share"]
    assert 0 < p["rows_packed"] < p["rows"] < 1
    assert f"{salted[0]}: 14 of 26 records usable" in out
    assert "skipped truncated_audio (bad data): 1" in out and "padding share of rows" in out
    # a clean manifest alone passes; a missing one is a clear error
    assert check.main([str(data["jsonl"]), "--audio-root", str(data["audio"]), "--workers", "1"]) == 0
    assert check.main([str(tmp_path / "none.jsonl"), "--audio-root", "x", "--workers", "1"]) == 2
    assert "manifest not found" in capsys.readouterr().err


# ------------------------------------------------------------------ MuFun's data format in full

def test_image_alias_npy_waveforms_and_per_file_time(data, tok, tmp_path):
    """MuFun's loader reads `"image"` as `"audio"`, `.npy` files as 16 kHz waveforms, and
    `"time"` with one pair per file; every one of them reaches the examples."""
    npy = tone(2.0, SR, 9)
    np.save(data["audio"] / "pre.npy", npy)
    np.save(data["audio"] / "ints.npy", (npy * 1000).astype(np.int16))
    two = conv("<audio>\nFirst. <audio>\nSecond?", "blues rock")
    records = [
        {"id": "alias", "image": "a.wav", "conversations": conv("<audio>\nWhat genre?", "blues")},
        {"id": "plain", "audio": "a.wav", "conversations": conv("<audio>\nWhat genre?", "blues")},
        {"id": "npy", "audio": ["pre.npy", "b.flac"], "time": [[0.5, 1.5], None], "conversations": two},
        {"id": "npy-alias", "image": "pre.npy", "time": [[0.25, 1.0]], "conversations": conv("<audio>\nQ?", "x")},
        {"id": "both", "audio": "a.wav", "image": "a.wav", "conversations": conv("<audio>\nQ?", "x")},
        {"id": "clash", "audio": "a.wav", "image": "b.flac", "conversations": conv("<audio>\nQ?", "x")},
        {"id": "int-npy", "audio": "ints.npy", "conversations": conv("<audio>\nQ?", "x")},
    ]
    path = tmp_path / "mufun.json"  # MuFun's own files are JSON lists
    path.write_text(json.dumps(records, indent=1))
    cfg = DataConfig(audio_root=str(data["audio"]), seq_len=1024, chunks_per_row=3, features="waveform")
    build = ExampleBuilder(cfg, tok, tokens_per_chunk=TPC)
    source = M.ManifestSource(path)
    ex = {r["id"]: build(source[i]) for i, r in enumerate(records)}
    for key in ("pieces", "chunks"):
        for a, b in zip(ex["alias"][key], ex["plain"][key]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ex["alias"]["audio"][0], ex["plain"]["audio"][0])
    np.testing.assert_array_equal(ex["npy"]["audio"][0], npy[8000:24000])  # [0.5, 1.5] s of the first file
    np.testing.assert_array_equal(ex["npy"]["audio"][1], A.load_audio(data["audio"] / "b.flac"))  # whole
    np.testing.assert_array_equal(ex["npy-alias"]["audio"][0], npy[4000:16000])
    assert ex["npy"]["seconds"] == pytest.approx(1.0 + 3.0)
    assert "skip" not in ex["both"]
    assert ex["clash"]["skip"] == "bad_record" and "alias 'image'" in ex["clash"]["message"]
    assert ex["int-npy"]["skip"] == "unreadable_audio" and "1-D float array" in ex["int-npy"]["message"]


def test_data_check_strict_stops_at_the_first_bad_record(data, salted, capsys):
    from jaxmusic.data import check

    path, bad, lines = salted
    first_bad = next(i for i, line in enumerate(lines) if line in bad.values()) + 1
    args = [str(path), "--audio-root", str(data["audio"]), "--workers", "1", "--max-chunks", "3",
            "--seq-len", "1024"]
    assert check.main(args + ["--strict"]) == 1
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("bad record")]
    assert len(err) == 1 and f"salted.jsonl:{first_bad}: " in err[0], captured.err
    assert "records usable" not in captured.out  # it stopped there, before any summary
    assert check.main([str(data["jsonl"]), "--audio-root", str(data["audio"]), "--workers", "1", "--strict"]) == 0
    assert "1 if any is" in check.build_parser().format_help().replace("\n", " ")


@pytest.mark.parametrize("packing", [False, True], ids=["rows", "packed"])
def test_resume_on_another_process_count_reads_every_record_once(data, tok, salted, packing):
    """A run saved on 2 processes resumes on 1 and on 4: together with what the 2 processes
    trained before the cut, every usable record of the epoch is trained exactly once."""
    path = salted[0]
    cfg = cfg_for(data, [path], packing=packing, seq_len=2048, chunks_per_row=4, prefetch_batches=2)
    everything, whole_state = run(cfg, tok)
    want = sorted(_samples(everything))
    # samples are distinct, so a duplicate would show (with 4 chunk slots the two-file long.wav record fits too)
    assert len(want) == len(set(want)) == whole_state["examples"] == len(data["records"]) + 1

    before, states = [], []
    for process, taken in ((0, 2), (1, 1)):  # the second process has read less (skips land unevenly)
        it = batches_of(cfg, tok, process_index=process, process_count=2)
        before += [next(it) for _ in range(taken)]
        states.append(json.loads(json.dumps(it.get_state())))
        it.close()
    assert states[0]["offset"] == 0 and states[1]["stride"] == 2
    if packing:
        assert any(s["pending"] for s in states), "the cut should hold examples deferred by packing"

    for count in (1, 4):
        after, finals = [], []
        for process in range(count):
            it = batches_of(cfg, tok, process_index=process, process_count=count)
            it.set_state(P.reshard_state(states, process, count))
            after += list(it)
            finals.append(it.get_state())
            it.close()
        got = sorted(_samples(before + after))
        assert got == want, f"{count} processes: {len(got)} samples for {len(want)} records"
        # the counters carry over: the resumed processes together account for the whole epoch
        assert sum(f["examples"] for f in finals) == whole_state["examples"]
        skipped = sum((collections.Counter(f["skipped"]) for f in finals), collections.Counter())
        assert skipped == whole_state["skipped"]

    # the saved count itself resumes each shard exactly where it was
    assert P.reshard_state(states, 1, 2) == states[1]
    with pytest.raises(ValueError, match="one complete set of shards"):
        P.reshard_state(states[:1], 0, 1)


def test_restore_data_state_reshards_manifest_sources(data, tok, salted):
    """What the trainer calls on resume, on another process count than the checkpoint's."""
    from jaxmusic.train.batches import ManifestBatches, restore_data_state

    cfg = cfg_for(data, [salted[0]])
    states = []
    for process in range(2):
        it = batches_of(cfg, tok, process_index=process, process_count=2)
        next(it)
        states.append(it.get_state())
        it.close()
    source = ManifestBatches(batches_of(cfg, tok), 0, 1)
    restore_data_state(source, {"process_count": 2, "states": states})
    state = source.get_state()
    source.close()
    assert (state["stride"], state["offset"]) == (1, 0)
    assert state["start"] == max(s["start"] + s["offset"] + 2 * s["next_index"] for s in states)
    assert state["examples"] == sum(s["examples"] for s in states)
    # a state saved before states carried their shard (shard-local indices) still restores
    old = {k: v for k, v in states[1].items() if k not in ("start", "stride", "offset", "extra")}
    it = batches_of(cfg, tok, process_index=1, process_count=2)
    it.set_state(old)
    assert it.get_state()["next_index"] == states[1]["next_index"]
    it.close()
