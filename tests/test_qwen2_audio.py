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
