"""Parity of the JAX Whisper encoder with transformers' PyTorch WhisperEncoder (tiny random models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperModel
from transformers.models.whisper.modeling_whisper import sinusoids as hf_sinusoids

from jaxmusic.models.hf_mapping import hf_weights, load_hf_weights
from jaxmusic.models.whisper import (
    HF_ENCODER_PREFIXES, Constant, WhisperEncoder, WhisperEncoderConfig, hf_tensors, sinusoids)
from jaxmusic.nn import ModelOptions

F32 = ModelOptions()
forward = nnx.jit(lambda model, features: model(features))


def tiny_hf_config(num_mel_bins: int) -> WhisperConfig:
    return WhisperConfig(
        vocab_size=100, num_mel_bins=num_mel_bins, d_model=64, encoder_layers=3,
        encoder_attention_heads=4, encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4,
        decoder_ffn_dim=128, max_source_positions=40, max_target_positions=32,
        pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Give every tensor a distinct random value (HF init leaves LayerNorms at 1/0 and biases at
    0, which would hide swapped or missing mappings). The position table stays sinusoidal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "embed_positions" in name:
                continue
            noise = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(1.0 + noise if "layer_norm.weight" in name else noise)


def build_reference(kind: str):
    """A tiny HF model in eval mode, its encoder state dict prefix, and input features."""
    num_mel_bins, model_cls, prefix = {
        "WhisperModel-16mel": (16, WhisperModel, "encoder."),
        "WhisperForConditionalGeneration-128mel": (128, WhisperForConditionalGeneration, "model.encoder."),
    }[kind]
    hf_cfg = tiny_hf_config(num_mel_bins)
    torch.manual_seed(0)
    model = model_cls(hf_cfg).eval()
    randomise(model, seed=1)
    features = torch.randn(2, num_mel_bins, 2 * hf_cfg.max_source_positions,
                           generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        encoder = model.get_encoder()
        ref = encoder(features, output_hidden_states=True).hidden_states
    return hf_cfg, model.state_dict(), prefix, features.numpy(), np.stack([h.numpy() for h in ref])


def load_ours(hf_cfg, state_dict, prefix, opts=F32) -> WhisperEncoder:
    cfg = WhisperEncoderConfig.from_hf(hf_cfg.to_dict())
    ours = WhisperEncoder(cfg, opts, nnx.Rngs(0))
    load_hf_weights(ours, hf_tensors(cfg), lambda k: state_dict[prefix + k].numpy(), cfg.n_layers)
    return ours


@pytest.fixture(scope="module", params=["WhisperModel-16mel", "WhisperForConditionalGeneration-128mel"])
def reference(request):
    return build_reference(request.param)


def test_config_from_full_whisper_config():
    cfg = WhisperEncoderConfig.from_hf(tiny_hf_config(128).to_dict())
    assert (cfg.num_mel_bins, cfg.d_model, cfg.n_layers, cfg.encoder_attention_heads,
            cfg.encoder_ffn_dim, cfg.max_source_positions) == (128, 64, 3, 4, 128, 40)
    assert cfg.head_dim == 16 and cfg.activation_function == "gelu"
    with pytest.raises(ValueError, match="activation_function"):
        WhisperEncoderConfig.from_hf({**tiny_hf_config(16).to_dict(), "activation_function": "relu"})
    with pytest.raises(ValueError, match="encoder_layers"):
        WhisperEncoderConfig.from_hf({"num_mel_bins": 16, "d_model": 64})


def test_hidden_states_match_transformers_float32(reference):
    hf_cfg, state_dict, prefix, features, ref = reference
    ours = load_ours(hf_cfg, state_dict, prefix)
    out = np.asarray(forward(ours, jnp.asarray(features)))
    assert out.shape == (hf_cfg.encoder_layers + 1, 2, hf_cfg.max_source_positions, hf_cfg.d_model)
    assert out.dtype == np.float32
    for i in range(len(ref)):
        # reached: max-abs error <= 4.8e-6 (hidden-state values up to ~8 in magnitude)
        np.testing.assert_allclose(out[i], ref[i], rtol=0, atol=1e-5, err_msg=f"hidden state {i}")


def test_bfloat16_compute_close_to_float32_reference(reference):
    hf_cfg, state_dict, prefix, features, ref = reference
    opts = ModelOptions(param_dtype=jnp.float32, dtype=jnp.bfloat16)
    out = np.asarray(forward(load_ours(hf_cfg, state_dict, prefix, opts), jnp.asarray(features)))
    assert out.dtype == jnp.bfloat16
    out = out.astype(np.float32)
    for i in range(len(ref)):
        rel = np.abs(out[i] - ref[i]).max() / np.abs(ref[i]).max()
        # reached: max-abs error / max-abs value <= 1.25e-2 (bfloat16 keeps 8 mantissa bits)
        assert rel < 2e-2, f"hidden state {i}: relative error {rel:.3g}"


def test_remat_matches_no_remat():
    hf_cfg, state_dict, prefix, features, _ = build_reference("WhisperModel-16mel")
    x = jnp.asarray(features)

    @nnx.jit
    def output_and_grads(model):
        loss = lambda m: jnp.sum(jnp.square(m(x)))
        return model(x), nnx.grad(loss)(model)

    out0, g0 = output_and_grads(load_ours(hf_cfg, state_dict, prefix, F32))
    assert "embed_positions" not in g0  # the fixed table gets no gradient
    for remat in ("full", "dots"):
        out1, g1 = output_and_grads(load_ours(hf_cfg, state_dict, prefix, ModelOptions(remat=remat)))
        # reached: outputs and gradients bit-exact on CPU (remat only changes what the backward
        # pass recomputes, not the arithmetic)
        np.testing.assert_array_equal(np.asarray(out0), np.asarray(out1), err_msg=remat)
        assert jax.tree.structure(g0) == jax.tree.structure(g1)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=remat)


def test_positions_are_fixed_constant_not_param():
    cfg = WhisperEncoderConfig.from_hf(tiny_hf_config(16).to_dict())
    model = WhisperEncoder(cfg, F32, nnx.Rngs(0))
    assert isinstance(model.embed_positions, Constant)
    assert not isinstance(model.embed_positions, nnx.Param)
    assert "embed_positions" not in nnx.state(model, nnx.Param)
    torch.manual_seed(0)
    hf_table = WhisperModel(tiny_hf_config(16)).encoder.embed_positions.weight.detach().numpy()
    # Our initial table matches the one transformers writes into a fresh model, up to torch's
    # float32 rounding (we compute in float64); checkpoints overwrite it on import anyway.
    np.testing.assert_allclose(np.asarray(model.embed_positions[...]), hf_table, rtol=0, atol=3e-6)  # reached 1.6e-6
    full_size = hf_sinusoids(1500, 1280).numpy()  # Whisper-large-v3's table
    np.testing.assert_allclose(sinusoids(1500, 1280), full_size, rtol=0, atol=2e-4)  # reached 1.0e-4


def test_hf_weights_round_trip_bit_exact(reference):
    hf_cfg, state_dict, prefix, _, _ = reference
    ours = load_ours(hf_cfg, state_dict, prefix)
    cfg = WhisperEncoderConfig.from_hf(hf_cfg.to_dict())
    exported = hf_weights(ours, hf_tensors(cfg), cfg.n_layers)
    expected = {k[len(prefix):]: v.numpy() for k, v in state_dict.items() if k.startswith(prefix)}
    assert set(exported) == set(expected)  # the mapping covers every encoder tensor, nothing more
    for key, value in expected.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key


def test_prefixes_name_each_hf_class():
    assert HF_ENCODER_PREFIXES == ("model.encoder.", "encoder.", "")
    hf_cfg = tiny_hf_config(16)
    encoder_keys = {s.hf_key.format(i=0) for s in hf_tensors(WhisperEncoderConfig.from_hf(hf_cfg.to_dict()))}
    torch.manual_seed(0)
    for model_cls, prefix in ((WhisperForConditionalGeneration, "model.encoder."), (WhisperModel, "encoder.")):
        keys = set(model_cls(hf_cfg).state_dict())
        assert {prefix + k for k in encoder_keys} <= keys, model_cls.__name__


def test_jit_matches_eager_and_rejects_bad_shapes(reference):
    hf_cfg, state_dict, prefix, features, _ = reference
    ours = load_ours(hf_cfg, state_dict, prefix)
    x = jnp.asarray(features)
    eager = np.asarray(ours(x))
    jitted = np.asarray(forward(ours, x))
    # reached: <= 1.7e-6 (XLA fuses the jitted graph differently from op-by-op execution)
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=5e-6)
    graphdef, state = nnx.split(ours)
    split_jit = jax.jit(lambda s, f: nnx.merge(graphdef, s)(f))
    np.testing.assert_allclose(np.asarray(split_jit(state, x)), eager, rtol=0, atol=5e-6)
    with pytest.raises(ValueError, match="input_features"):
        ours(x[:, :, :-2])
