"""Qwen2-Audio as a configuration: parity with transformers' `Qwen2ForCausalLM` and
`Qwen2AudioForConditionalGeneration` (tiny random models), import/export of the released layout."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxmusic.generate import generate
from jaxmusic.models.hf_mapping import hf_weights, load_hf_weights
from jaxmusic.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, hf_tensors
from jaxmusic.nn import ModelOptions

VOCAB = 300


def _randomize_norms(model):
    with torch.no_grad():  # norms and biases start at ones/zeros; randomise them so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))


def qwen2_config(vocab: int, **kw) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=4096,
        # wider than the 0.02 default so logits are spread out and greedy has no near-ties
        initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)


@pytest.fixture(scope="module")
def qwen2_pair():
    torch.manual_seed(3)
    hf = transformers.Qwen2ForCausalLM(qwen2_config(VOCAB)).eval()
    _randomize_norms(hf)
    cfg = Qwen3Config.from_hf(hf.config.to_dict())
    model = Qwen3ForCausalLM(cfg, ModelOptions(), nnx.Rngs(0))
    sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    load_hf_weights(model, hf_tensors(cfg), sd.__getitem__, cfg.n_layers)
    return hf, model, sd


def test_qwen2_config_switches():
    cfg = Qwen3Config.from_hf(qwen2_config(VOCAB).to_dict())
    assert (cfg.model_type, cfg.attention_bias, cfg.qk_norm) == ("qwen2", True, False)
    keys = {s.hf_key for s in hf_tensors(cfg)}
    assert "model.layers.{i}.self_attn.q_proj.bias" in keys and "model.layers.{i}.self_attn.o_proj.bias" not in keys
    assert not any("q_norm" in k for k in keys)
    with pytest.raises(ValueError, match="use_sliding_window"):
        Qwen3Config.from_hf({**qwen2_config(VOCAB).to_dict(), "use_sliding_window": True})


def test_qwen2_logits_generate_round_trip(qwen2_pair):
    hf, model, sd = qwen2_pair
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 13))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    logits, _ = model(model.embed(jnp.asarray(ids)), jnp.broadcast_to(jnp.arange(13), ids.shape))
    # reached: 2.6e-6 max-abs (logits up to 3.1)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)

    prompt = ids[:1, :9]
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompt), do_sample=False, max_new_tokens=16)[0, 9:].tolist()
    got = generate(model, model.embed(jnp.asarray(prompt)), [9], max_new_tokens=16)[0]
    assert got == want  # the CPU fast path (per-layer views, biases included)
    assert generate(model, model.embed(jnp.asarray(prompt)), [9], max_new_tokens=16, unrolled=False)[0] == want

    cfg = model.cfg
    back = hf_weights(model, hf_tensors(cfg), cfg.n_layers)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert np.array_equal(back[k], v), k


# ------------------------------------------------------------------ the whole Qwen2-Audio

QUESTION = "What is playing?"


def _torch_qwen2_audio(tokenizer):
    torch.manual_seed(5)
    audio = dict(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                 max_source_positions=1500)
    cfg = transformers.Qwen2AudioConfig(audio_config=audio, text_config=qwen2_config(len(tokenizer) + 1).to_dict(),
                                        audio_token_id=len(tokenizer))  # an id no text tokenises to
    model = transformers.Qwen2AudioForConditionalGeneration(cfg).eval()
    _randomize_norms(model)
    return model


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    import subprocess
    import sys
    from pathlib import Path

    import soundfile as sf

    from jaxmusic import templates
    from jaxmusic.demo.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("qwen2_audio")
    chat = templates.inference_prompt("<audio>\n" + QUESTION, 1, template="chatml")
    tokenizer = train_tokenizer([chat, "a piano a guitar drums"], vocab_size=300)
    hf = _torch_qwen2_audio(tokenizer)
    hf.save_pretrained(root / "released", safe_serialization=True)
    tokenizer.save_pretrained(str(root / "released"))
    for name, seconds in (("song.wav", 30), ("short.wav", 7.3)):  # a whole chunk (750 tokens), a padded one
        t = np.arange(int(seconds * 16000)) / 16000
        sf.write(root / name, (0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.1 * np.sin(t)))).astype(np.float32), 16000)
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(repo / "convert" / "hf_to_jax.py"), "--qwen2-audio",
                           str(root / "released"), "--out", str(root / "ckpt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return root, hf, repo


def _hf_inputs(hf, text, mels, frames):
    """transformers' inputs for our tokenised prompt and one-chunk files with `frames` log-mel frames
    of audio each: `<|AUDIO|>` once per pooled frame, as its processor expands it."""
    ids = []
    for i, piece in enumerate(text.pieces):
        ids += list(piece)
        if i < len(mels):
            ids += [hf.config.audio_token_id] * ((((frames[i] - 1) // 2 + 1) - 2) // 2 + 1)  # the processor's formula
    features = torch.from_numpy(np.concatenate(mels))
    mask = torch.arange(features.shape[2])[None, :] < torch.tensor(frames)[:, None]
    return dict(input_ids=torch.tensor([ids]), input_features=features, feature_attention_mask=mask.long())


@pytest.mark.parametrize("clip, tokens", [("song.wav", 750), ("short.wav", 182)])
def test_qwen2_audio_logits_generate_score(released, clip, tokens):
    from jaxmusic import inference, templates

    root, hf, _ = released
    loaded = inference.load(root / "ckpt")
    assert loaded.cfg.tokens_per_chunk(1500) == 750
    request = inference.Request(QUESTION, (str(root / clip),))
    mels, frames = inference.request_audio(loaded, request)
    text = templates.encode_prompt(QUESTION, 1, loaded.tokenizer, template="chatml")
    inputs = _hf_inputs(hf, text, mels, [f[0] for f in frames])
    with torch.no_grad():
        ref = hf(**inputs).logits[0].numpy()
    plan, chunks = inference.layout_batch(loaded, [text], [mels], [frames])
    n = plan.lengths[0]
    assert n == ref.shape[0] == sum(len(p) for p in text.pieces) + tokens  # 7.3 s: 730 log-mel frames -> 365 -> 182
    ours = np.asarray(inference.spliced_logits(loaded.model, chunks, plan.input_ids, plan.audio_index, plan.is_audio,
                                               plan.positions, plan.attention_mask, plan.chunk_frames))[0, :n]
    # reached: 2.1e-6 max-abs over all positions and the vocabulary, both clips (logits up to 3.6)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    with torch.no_grad():
        want = hf.generate(**inputs, do_sample=False, max_new_tokens=16)[0, n:].tolist()
    embeds = inference.embed_batch(loaded.model, chunks, plan.input_ids, plan.audio_index, plan.is_audio,
                                   chunk_frames=plan.chunk_frames)
    got = generate(nnx.split(loaded.model.llm), embeds, plan.lengths, max_new_tokens=16)[0]
    assert got == want

    options = ["a piano", "drums"]
    for option, s in zip(options, inference.score(loaded, request, options)):
        scored = templates.encode_scoring(QUESTION, option, 1, loaded.tokenizer, template="chatml")
        with torch.no_grad():
            logp = torch.log_softmax(hf(**_hf_inputs(hf, scored, mels, [f[0] for f in frames])).logits[0], -1).numpy()
        last, mask = scored.pieces[-1], scored.loss_masks[-1]
        offset = logp.shape[0] - len(last)
        ref_lp = [logp[offset + j - 1, last[j]] for j in np.flatnonzero(mask)]
        # reached: 9.5e-7 (30 s clip), 4.8e-7 (7.3 s) on per-token log-likelihoods
        np.testing.assert_allclose(s.per_token, ref_lp, atol=1e-3)


def test_qwen2_audio_export_round_trip_is_bit_exact(released, tmp_path):
    import json
    import subprocess
    import sys

    from safetensors.numpy import load_file

    root, hf, repo = released
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, str(repo / "convert" / "jax_to_hf.py"), str(root / "ckpt"),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    original = load_file(root / "released" / "model.safetensors")
    exported = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_audio" and config["audio_token_index"] == hf.config.audio_token_id
    reloaded = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(out)
    assert reloaded.config.text_config.hidden_size == hf.config.text_config.hidden_size


def test_qwen2_audio_stage_and_data_check_read_the_model_config():
    from jaxmusic.data.check import model_settings
    from jaxmusic.train import config as C
    from jaxmusic.train.state import ModelSpec, resolve_model

    from jaxmusic.configs import ROOT

    stage = C.load(ROOT / "stages" / "qwen2_audio_finetune.yaml", ["init.source=random", "init.path=null"]).stages[0]
    spec = ModelSpec.from_stage(resolve_model(stage, None))
    assert (spec.llm.model_type, spec.mufun.connector, spec.tokens_per_chunk) == ("qwen2", "linear", 750)
    assert model_settings("qwen2_audio") == (750, "chatml")
    assert model_settings("mufun") == (300, "qwen2_instruct")


def test_compare_paired_differences_and_standard_errors():
    from types import SimpleNamespace

    from jaxmusic.evaluation.report import compare, format_comparison

    items = [SimpleNamespace(key=str(i), subset="a" if i < 4 else "b") for i in range(6)]
    status = lambda seq: {str(i): {"status": s} for i, s in enumerate(seq)}  # noqa: E731
    first = status(["correct", "wrong", "wrong", "correct", "correct", "skipped"])
    second = status(["correct", "correct", "correct", "wrong", "wrong", "correct"])
    cmp = compare(items, [("m", first), ("q", second)])
    a = cmp["subsets"]["a"]
    assert (a["accuracy"]["m"], a["accuracy"]["q"], a["diff"]["q"]) == (0.5, 0.75, 0.25)
    # per-item differences 0, 1, 1, -1: mean 0.25, sample std 0.957, se 0.479
    assert a["se"]["q"] == pytest.approx(np.std([0, 1, 1, -1], ddof=1) / 2)
    b = cmp["subsets"]["b"]  # item 5 is skipped by m: only item 4 is paired
    assert (b["paired_items"]["q"], b["diff"]["q"], b["se"]["q"]) == (1, -1.0, 0.0)
    assert cmp["overall"]["macro"]["diff"]["q"] == pytest.approx((0.25 - 1.0) / 2)
    table = format_comparison(cmp)
    assert "q - m" in table and "+25.0 +- 47.9" in table


def test_qwen2_audio_cli_imports_released_folder_and_keeps_first_30s(released, tmp_path):
    import json
    import os
    import subprocess
    import sys

    import soundfile as sf

    root, _, _ = released
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(45 * 16000, np.float32), 16000)
    proc = subprocess.run([sys.executable, "-m", "jaxmusic.cli", "score", str(root / "released"), "--audio", str(long),
                           QUESTION, "--option", "a piano", "--option", "drums", "--json"], capture_output=True,
                          text=True, env={**os.environ, "JAXMUSIC_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "Qwen2-Audio" in proc.stdout
    assert len(json.loads(proc.stdout[proc.stdout.index("{"):])["options"]) == 2

    from jaxmusic import inference

    loaded = inference.load(root / "ckpt")
    assert [len(m) for m in inference.request_mels(loaded, inference.Request(QUESTION, (str(long),)))] == [1]


def test_chatml_renders_qwen2_audio_chat_template():
    import jinja2
    from transformers import Qwen2AudioProcessor

    from jaxmusic import templates

    turns = [("<audio>\nWhat's that sound?", "Glass breaking."), ("<audio>\nAnd this one?", "A cough.")]
    messages = []
    for question, answer in turns:
        messages += [{"role": "user", "content": [{"type": "audio", "audio_url": "x.wav"},
                                                  {"type": "text", "text": question.split("\n", 1)[1]}]},
                     {"role": "assistant", "content": answer}]
    source = Qwen2AudioProcessor.default_chat_template.fget(None)
    want = jinja2.Template(source).render(messages=messages, add_generation_prompt=False)
    ours = "".join(text for text, _ in templates.render("chatml", turns))
    assert ours.replace(templates.AUDIO_PLACEHOLDER, "<|AUDIO|>") == want
    prompt = templates.inference_prompt(turns[0][0], 1, template="chatml")
    want_prompt = jinja2.Template(source).render(messages=messages[:1], add_generation_prompt=True)
    assert prompt.replace(templates.AUDIO_PLACEHOLDER, "<|AUDIO|>") == want_prompt
