"""Tiny models whose output is known in advance, for the evaluation tests.

A Qwen3 is wired as a bigram machine: every layer's output projections are zero, so the hidden
state at a position is its token's embedding; the embeddings are one-hot "states" and
`lm_head` maps each state to one next token (`forced_qwen3(tok, chain)`, `chain`: token ->
next token). `save_forced_mufun` puts such an LLM in a released-layout MuFun (random Whisper
and connector) that answers `FORCED` then `<|im_end|>` to any MuCUE prompt, when generating
and when an option is scored; `save_forced_qwen3` saves one as a Hugging Face Qwen3 folder
(the `--judge` tests).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM, WhisperConfig, WhisperForConditionalGeneration

from jaxmusic import templates
from jaxmusic.templates import mucue_prompt

REPO = Path(__file__).resolve().parent.parent
FORCED = "blues"
GENRES = ["blues", "jazz", "rock", "pop"]
HIDDEN = 32


def write_audio(root: Path):
    t = np.arange(3 * 16000) / 16000
    sf.write(root / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    t = np.arange(7 * 22050) / 22050  # three chunks: the test encoder's chunks are 3 s (150 positions)
    sf.write(root / "long.flac", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 22050)
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt not really a wave file" * 4)


def answer_chain(tok) -> dict[int, int]:
    """token -> next token, so both a greedy answer and a scored option read `FORCED<|im_end|>`."""
    im_end = tok.convert_tokens_to_ids(templates.END_OF_TURN)
    prompt = mucue_prompt("Genre?", GENRES)
    generated = [int(templates.encode_prompt(prompt, 1, tok).pieces[-1][-1])]
    generated += tok(FORCED, add_special_tokens=False)["input_ids"] + [im_end]
    scored = templates.encode_scoring(prompt, FORCED, 1, tok)
    ids, mask = scored.pieces[-1], scored.loss_masks[-1]
    scored = [int(x) for x in ids[int(np.flatnonzero(mask)[0]) - 1:]]  # the token before the answer, the answer
    chain = {}
    for seq in (generated, scored):
        for a, b in zip(seq, seq[1:]):
            assert chain.setdefault(a, b) == b, "the two chains disagree; pick another forced answer"
    return chain


def forced_qwen3(tok, chain: dict[int, int]) -> tuple[Qwen3ForCausalLM, Qwen3Config]:
    qcfg = Qwen3Config(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    llm = Qwen3ForCausalLM(qcfg)
    assert len(chain) < HIDDEN
    emb = torch.zeros(len(tok), HIDDEN)
    emb[:, -1] = 1.0                        # every token outside the chain: a state with no preference
    head = torch.zeros(len(tok), HIDDEN)
    for state, (token, nxt) in enumerate(chain.items()):
        emb[token] = 0.0
        emb[token, state] = 1.0
        head[nxt, state] = 30.0 / HIDDEN ** 0.5  # RMSNorm scales a one-hot to sqrt(HIDDEN): logit 30
    with torch.no_grad():
        llm.model.embed_tokens.weight.copy_(emb)
        llm.lm_head.weight.copy_(head)
        llm.model.norm.weight.fill_(1.0)
        for layer in llm.model.layers:  # no layer changes the residual stream
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return llm, qcfg


def save_forced_mufun(folder: Path, tok):
    """A released-layout MuFun folder whose LLM answers `FORCED` (see `answer_chain`)."""
    torch.manual_seed(0)
    wcfg = WhisperConfig(num_mel_bins=128, d_model=16, encoder_layers=3, encoder_attention_heads=2,
                         encoder_ffn_dim=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
                         max_source_positions=150, vocab_size=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, decoder_start_token_id=1)
    encoder = WhisperForConditionalGeneration(wcfg).get_encoder()
    llm, qcfg = forced_qwen3(tok, answer_chain(tok))
    # blp_4i_2x: four fused encoder states (0..3), hidden width twice the fused width
    connector = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, HIDDEN))
    save_released(folder, wcfg, encoder, qcfg, llm, connector, tok)


def save_released(folder: Path, wcfg, encoder, qcfg, llm, connector, tokenizer):
    """Torch modules -> a folder in MuFun's released layout (blp_4i_2x connector, `tinyllava` config)."""
    folder.mkdir()
    tensors = {f"vision_tower._vision_tower.{k}": v for k, v in encoder.state_dict().items()}
    tensors.update({f"language_model.{k}": v for k, v in llm.state_dict().items()})
    for i, name in ((0, "linear1"), (2, "linear2")):
        tensors[f"connector._connector.{name}.weight"] = connector[i].weight
        tensors[f"connector._connector.{name}.bias"] = connector[i].bias
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, folder / "model.safetensors")
    config = {"model_type": "tinyllava", "connector_type": "blp_4i_2x", "hidden_size": qcfg.hidden_size,
              "vision_hidden_size": wcfg.d_model, "text_config": qcfg.to_dict(), "vision_config": wcfg.to_dict()}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(folder))


def forced_mufun_checkpoint(root: Path, tok) -> Path:
    """`save_forced_mufun` in `root/released`, converted with `convert/hf_to_jax.py --mufun` to
    the jaxmusic checkpoint `root/ckpt` (four fused encoder layers, pooled by 5)."""
    save_forced_mufun(root / "released", tok)
    (root / "mufun.yaml").write_text("fusion_layers: [0, 1, 2, 3]\npool_kernel: 5\npool_stride: 5\n")
    ckpt = root / "ckpt"
    proc = subprocess.run([sys.executable, str(REPO / "convert" / "hf_to_jax.py"), "--mufun", str(root / "released"),
                           "--mufun-config", str(root / "mufun.yaml"), "--out", str(ckpt)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return ckpt


def save_forced_qwen3(folder: Path, tok, chain: dict[int, int]):
    """A Hugging Face Qwen3 folder (config, safetensors, tokenizer) wired by `chain`."""
    torch.manual_seed(0)
    llm, _ = forced_qwen3(tok, chain)
    llm.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
