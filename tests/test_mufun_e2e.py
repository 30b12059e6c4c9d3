"""End-to-end parity with a PyTorch MuFun in the released layout.

The reference is assembled here from transformers' `WhisperEncoder` and `Qwen3ForCausalLM`
plus a connector written from the brief's formulas (Linear -> exact GELU -> Linear on the
concatenated hidden states 0, 1, 3, 4, mean-pooled 5:1), saved as a released MuFun folder
(`config.json` with model_type "tinyllava", prefixed tensors), imported with
`convert/hf_to_jax.py --mufun`, and compared on a two-audio interleaved prompt whose first
file is 75 s long (3 chunks).
"""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf
import torch
from flax import nnx
from transformers import Qwen3Config, Qwen3ForCausalLM, WhisperConfig, WhisperForConditionalGeneration

from jaxmusic import audio, inference, templates
from jaxmusic.demo.tokenizer import train_tokenizer

from forced_model import save_released

REPO = Path(__file__).resolve().parent.parent
FUSION = [0, 1, 3, 4]
POOL = 5
QUESTION = "<audio>\nFirst song. <audio> Second song. Which one is faster?"


def _torch_mufun(seed=0):
    torch.manual_seed(seed)
    wcfg = WhisperConfig(num_mel_bins=128, d_model=32, encoder_layers=4, encoder_attention_heads=2,
                         encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                         max_source_positions=1500, vocab_size=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, decoder_start_token_id=1)
    encoder = WhisperForConditionalGeneration(wcfg).get_encoder().eval()
    tokenizer = train_tokenizer([templates.SYSTEM, QUESTION, "USER: ASSISTANT: fast slow the first second"],
                                vocab_size=300)
    qcfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    llm = Qwen3ForCausalLM(qcfg).eval()
    d_in = len(FUSION) * wcfg.d_model
    connector = torch.nn.Sequential(torch.nn.Linear(d_in, 2 * d_in), torch.nn.GELU(),
                                     torch.nn.Linear(2 * d_in, qcfg.hidden_size)).eval()
    return wcfg, encoder, qcfg, llm, connector, tokenizer


def _write_audio(folder: Path):
    rng = np.random.default_rng(0)
    t75 = np.arange(75 * 22050) / 22050
    song1 = 0.3 * np.sin(2 * np.pi * 220 * t75 * (1 + 0.1 * np.sin(t75))) + 0.02 * rng.standard_normal(t75.size)
    t9 = np.arange(9 * 16000) / 16000
    song2 = 0.2 * np.sign(np.sin(2 * np.pi * 3 * t9)) * np.sin(2 * np.pi * 440 * t9)
    paths = [folder / "song1.flac", folder / "song2.wav"]
    sf.write(paths[0], np.stack([song1, 0.5 * song1], 1).astype(np.float32), 22050)
    sf.write(paths[1], song2.astype(np.float32), 16000)
    return paths


@torch.no_grad()
def _torch_audio_tokens(encoder, connector, mel):
    hidden = encoder(torch.from_numpy(mel), output_hidden_states=True).hidden_states
    fused = torch.cat([hidden[i] for i in FUSION], dim=-1)
    pooled = torch.nn.functional.avg_pool1d(fused.transpose(1, 2), POOL, POOL).transpose(1, 2)
    return connector(pooled).reshape(-1, connector[2].out_features)


@torch.no_grad()
def _torch_logits(llm, encoder, connector, text: templates.TokenizedText, mels):
    embed = llm.get_input_embeddings()
    parts = []
    for i, ids in enumerate(text.pieces):
        parts.append(embed(torch.from_numpy(np.asarray(ids, np.int64))))
        if i < len(mels):
            parts.append(_torch_audio_tokens(encoder, connector, mels[i]))
    embeds = torch.cat(parts)[None]
    return llm(inputs_embeds=embeds).logits[0].numpy(), embeds.shape[1]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    parts = _torch_mufun()
    save_released(root / "released", *parts)
    (root / "mufun.yaml").write_text(f"fusion_layers: {FUSION}\npool_kernel: {POOL}\npool_stride: {POOL}\n")
    ckpt = root / "ckpt"
    proc = subprocess.run([sys.executable, str(REPO / "convert" / "hf_to_jax.py"), "--mufun",
                           str(root / "released"), "--mufun-config", str(root / "mufun.yaml"), "--out", str(ckpt)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return root, ckpt, parts, _write_audio(root)


def test_logits_match_pytorch_on_interleaved_two_audio_prompt(released):
    root, ckpt, (wcfg, encoder, qcfg, llm, connector, tokenizer), paths = released
    loaded = inference.load(ckpt)
    request = inference.Request(QUESTION, tuple(map(str, paths)))
    text = templates.encode_prompt(QUESTION, 2, loaded.tokenizer)
    mels = inference.request_mels(loaded, request)
    assert [len(m) for m in mels] == [3, 1]  # 75 s -> 30 + 30 + 15 s

    ref, n = _torch_logits(llm, encoder, connector, text, mels)
    plan, chunks = inference.layout_batch(loaded, [text], [mels])
    ours = inference.spliced_logits(loaded.model, chunks, plan.input_ids, plan.audio_index, plan.is_audio,
                             plan.positions, plan.attention_mask)
    ours = np.asarray(ours)[0, :n]
    assert plan.lengths[0] == n == sum(len(p) for p in text.pieces) + 4 * 300
    # reached: 3.3e-7 max-abs over all positions and the whole vocabulary (logits up to 0.6)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_score_matches_pytorch(released):
    root, ckpt, (wcfg, encoder, qcfg, llm, connector, tokenizer), paths = released
    loaded = inference.load(ckpt)
    request = inference.Request(QUESTION, tuple(map(str, paths)))
    options = ["the first", "the second one", "fast"]
    scores = inference.score(loaded, request, options)
    mels = inference.request_mels(loaded, request)
    for option, s in zip(options, scores):
        text = templates.encode_scoring(QUESTION, option, 2, loaded.tokenizer)
        logits, _ = _torch_logits(llm, encoder, connector, text, mels)
        ids = np.concatenate(text.pieces)
        mask = np.concatenate(text.loss_masks)
        # positions of the last piece's labelled tokens in the spliced sequence
        offset = logits.shape[0] - len(text.pieces[-1])
        logp = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
        last_ids, last_mask = text.pieces[-1], text.loss_masks[-1]
        assert mask.sum() == last_mask.sum() == len(s.per_token)
        ref = [logp[offset + j - 1, last_ids[j]] for j in np.flatnonzero(last_mask)]
        # reached: 4.8e-7 on per-token log-likelihoods, < 1e-6 on totals
        np.testing.assert_allclose(s.per_token, ref, atol=1e-3)
        assert abs(s.total - sum(ref)) < 1e-3
        assert len(ids) == sum(len(p) for p in text.pieces)


def test_released_export_round_trip_is_bit_exact(released, tmp_path):
    root, ckpt, *_ = released
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, str(REPO / "convert" / "jax_to_hf.py"), str(ckpt), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from safetensors.numpy import load_file

    original = load_file(root / "released" / "model.safetensors")
    files = sorted(out.glob("*.safetensors"))
    exported = {k: v for f in files for k, v in load_file(f).items()}
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tinyllava" and config["connector_type"] == "blp_4i_2x"


def test_cli_ask_and_score(released):
    root, ckpt, _, paths = released
    base = [sys.executable, "-m", "jaxmusic.cli"]
    ask = subprocess.run(base + ["ask", str(ckpt), "--audio", str(paths[0]), "--audio", str(paths[1]),
                                 "--max-new-tokens", "5", QUESTION], capture_output=True, text=True)
    assert ask.returncode == 0, ask.stderr
    score = subprocess.run(base + ["score", str(root / "released"), "--audio", str(paths[1]), "Fast?",
                                   "--mufun-config", str(root / "mufun.yaml"), "--option", "yes", "--option", "no", "--json"], capture_output=True, text=True,
                           env={**__import__("os").environ, "JAXMUSIC_CACHE": str(root / "cache")})
    assert score.returncode == 0, score.stderr
    result = json.loads(score.stdout[score.stdout.index("{"):])
    assert result["best"] in ("yes", "no") and len(result["options"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--audio", "missing.wav", "q"], "missing.wav"),
    (["--audio", "{song}", "<audio> <audio> two tags"], "tags"),
    (["--audio", "{song}", "   "], "empty"),
    (["--audio", "{song}", "--segment", "5", "2", "q"], "crop"),
])
def test_cli_user_errors_are_one_line(released, args, message):
    root, ckpt, _, paths = released
    args = [a.replace("{song}", str(paths[1])) for a in args]
    proc = subprocess.run([sys.executable, "-m", "jaxmusic.cli", "ask", str(ckpt)] + args,
                          capture_output=True, text=True)
    assert proc.returncode == 2  # a user error
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in lines[0].lower() or message in lines[0]


def test_cli_rejects_folder_that_is_neither_format(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxmusic.cli", "ask", str(tmp_path), "q"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "neither" in proc.stderr and "Traceback" not in proc.stderr


def test_assemble_from_backbones_initialises_the_connector(released, tmp_path):
    root, _, (wcfg, encoder, qcfg, llm, connector, tokenizer), paths = released
    whisper_dir, llm_dir = tmp_path / "whisper", tmp_path / "qwen3"
    full = WhisperForConditionalGeneration(wcfg)
    full.model.encoder.load_state_dict(encoder.state_dict())
    full.save_pretrained(whisper_dir)
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(str(llm_dir))
    ckpt = tmp_path / "assembled"
    proc = subprocess.run([sys.executable, str(REPO / "convert" / "hf_to_jax.py"), "--whisper", str(whisper_dir),
                           "--llm", str(llm_dir), "--mufun-config", str(root / "mufun.yaml"), "--out", str(ckpt)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    loaded = inference.load(ckpt)
    conn = loaded.model.connector.params()
    # the documented init: weights N(0, 0.02), biases zero
    for lin in ("linear1", "linear2"):
        assert np.all(np.asarray(conn[lin]["bias"]) == 0)
        assert abs(float(np.asarray(conn[lin]["weight"]).std()) - 0.02) < 0.002
    # the backbones are the sources' weights, bit for bit
    q = np.asarray(loaded.model.llm.layers.self_attn.q_proj.weight[...])
    ref = llm.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(q[1], ref)
    mel = inference.request_mels(loaded, inference.Request("q", (str(paths[1]),)))
    assert len(mel) == 1


def test_cli_batch_mode_matches_single_requests(released, tmp_path):
    root, ckpt, _, paths = released
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "audio": str(paths[1]), "question": "Is it fast?"},
        {"id": "b", "audio": [str(paths[0]), str(paths[1])], "question": QUESTION, "time": [[0, 20], None]},
    ]) + "\n")
    answers = tmp_path / "answers.jsonl"
    proc = subprocess.run([sys.executable, "-m", "jaxmusic.cli", "ask", str(ckpt), "--batch", str(requests),
                           "--out", str(answers), "--max-new-tokens", "6"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [g["id"] for g in got] == ["a", "b"]
    loaded = inference.load(ckpt)
    alone = inference.ask(loaded, [inference.Request("Is it fast?", (str(paths[1]),))], max_new_tokens=6)
    assert got[0]["answer"] == alone[0]


def test_ask_says_whether_an_answer_stopped(released):
    _, ckpt, _, paths = released
    loaded = inference.load(ckpt)
    request = [inference.Request("Is it fast?", (str(paths[1]),))]
    never, always = copy.copy(loaded), copy.copy(loaded)
    never.stop_ids = ()
    always.stop_ids = tuple(range(loaded.model.llm.cfg.vocab_size))  # whatever comes first stops it
    assert not inference.ask(never, request, max_new_tokens=3)[0].terminated
    stopped = inference.ask(always, request, max_new_tokens=3)[0]
    assert stopped.terminated and stopped == ""


def _as_version_1(ckpt: Path, out: Path) -> None:
    """`ckpt` rewritten as the first checkpoint format wrote it: the connector's Linear weights as
    `kernel [in, out]`, Whisper's convolutions as `kernel [width, in, out]`, `version: 1`."""
    import orbax.checkpoint as ocp

    from jaxmusic.checkpoints import PARAMS_DIR, restore_params, stored_shapes

    shapes = stored_shapes(ckpt / PARAMS_DIR)
    abstract = {}
    for path, shape in shapes.items():
        node = abstract
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
    params = jax.tree.map(np.asarray, restore_params(ckpt / PARAMS_DIR, abstract))
    for lin in ("linear1", "linear2"):
        params["connector"][lin]["kernel"] = params["connector"][lin].pop("weight").T
    for conv in ("conv1", "conv2"):
        params["whisper"][conv]["kernel"] = params["whisper"][conv].pop("weight").transpose(2, 1, 0)
    shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns(PARAMS_DIR))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((out / PARAMS_DIR).absolute(), params)
    meta = json.loads((out / "jaxmusic.json").read_text())
    (out / "jaxmusic.json").write_text(json.dumps({**meta, "version": 1}))


def test_version_1_checkpoints_load_and_export_in_todays_layout(released, tmp_path, caplog):
    root, ckpt, *_ = released
    old = tmp_path / "v1"
    _as_version_1(ckpt, old)
    with caplog.at_level("WARNING"):
        migrated = inference.load(old)
    assert sum("version 1 layout" in r.getMessage() for r in caplog.records) == 1
    today = inference.load(ckpt)
    for a, b in zip(jax.tree.leaves(nnx.state(today.model)), jax.tree.leaves(nnx.state(migrated.model))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, str(REPO / "convert" / "jax_to_hf.py"), str(old), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from safetensors.numpy import load_file

    original = load_file(root / "released" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(original) and all(np.array_equal(exported[k], v) for k, v in original.items())
