"""HF <-> jaxmusic checkpoint conversion: bit-exact round trips, transformers parity, errors.

Every model here is a tiny random transformers model saved with safetensors inside the test.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
import torch
import transformers as tr
from flax import nnx
from safetensors.torch import load_file

from jaxmusic import checkpoints as checkpoint
from jaxmusic.models import qwen3, whisper
from jaxmusic.nn import ModelOptions

REPO = Path(__file__).resolve().parent.parent
WHISPER_DECODER_START = 2


def qwen3_config(tied=False):
    return tr.Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          tie_word_embeddings=tied,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def whisper_config():
    return tr.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                            decoder_ffn_dim=48, num_mel_bins=16, max_source_positions=30,
                            max_target_positions=20, pad_token_id=1, bos_token_id=2, eos_token_id=3,
                            decoder_start_token_id=WHISPER_DECODER_START)


def save(model, folder, dtype=torch.float32, **kw):
    model.to(dtype).save_pretrained(folder, safe_serialization=True, **kw)
    return folder


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Source folders, built once: {name: folder}."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    qwen = tr.Qwen3ForCausalLM(qwen3_config()).eval()
    folders = {
        "llm_f32": save(qwen, root / "llm_f32"),
        # ~10 KB shards force an index with several files.
        "llm_bf16_sharded": save(tr.Qwen3ForCausalLM(qwen3_config()), root / "llm_bf16", torch.bfloat16,
                                 max_shard_size="10KB"),
        "llm_tied": save(tr.Qwen3ForCausalLM(qwen3_config(tied=True)), root / "llm_tied"),
    }
    (folders["llm_f32"] / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    wsp = tr.WhisperForConditionalGeneration(whisper_config()).eval()
    folders["whisper_f32"] = save(wsp, root / "whisper_f32")
    (folders["whisper_f32"] / "preprocessor_config.json").write_text('{"feature_size": 16}')
    folders["whisper_model"] = save(wsp.model, root / "whisper_model")           # "encoder.*"
    folders["whisper_encoder"] = save(wsp.model.encoder, root / "whisper_encoder")  # bare "*"
    folders["whisper_f16"] = save(tr.WhisperForConditionalGeneration(whisper_config()), root / "whisper_f16",
                                  torch.float16)
    return folders


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in Path(folder).glob("*.safetensors"):
        out.update(load_file(f))
    return out


def assert_bit_exact(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].flatten().view(torch.uint8), b[k].flatten().view(torch.uint8)), k


def convert_and_back(hf_dir, part, tmp_path, dtype="float32", **export_kw):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    checkpoint.import_hf(ckpt, dtype=dtype, **{part: str(hf_dir)})
    checkpoint.export_hf(ckpt, out, part, **export_kw)
    return ckpt, out


@pytest.mark.parametrize("name,dtype", [("llm_f32", "float32"), ("llm_bf16_sharded", "float32"),
                                        ("llm_bf16_sharded", "bfloat16"), ("llm_tied", "float32")])
def test_llm_round_trip_is_bit_exact_and_transformers_gives_identical_logits(hf, tmp_path, name, dtype):
    _, out = convert_and_back(hf[name], "llm", tmp_path, dtype=dtype, max_shard_size=12_000)
    assert_bit_exact(tensors(hf[name]), tensors(out))
    index = json.loads((out / "model.safetensors.index.json").read_text())  # 12 KB shards -> index
    assert set(index["weight_map"]) == set(tensors(out))

    original = tr.Qwen3ForCausalLM.from_pretrained(hf[name]).eval()
    exported, info = tr.Qwen3ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert exported.dtype == original.dtype
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(original(ids).logits, exported.eval()(ids).logits)


def test_float32_source_in_bfloat16_checkpoint_rounds_to_nearest(hf, tmp_path):
    _, out = convert_and_back(hf["llm_f32"], "llm", tmp_path, dtype="bfloat16")
    src, back = tensors(hf["llm_f32"]), tensors(out)
    for k in src:  # exported in the source dtype (float32), carrying bfloat16-rounded values
        assert back[k].dtype == torch.float32
        assert torch.equal(back[k], src[k].to(torch.bfloat16).to(torch.float32)), k


@pytest.mark.parametrize("name", ["whisper_f32", "whisper_f16"])
def test_whisper_round_trip_with_source_is_a_complete_identical_model(hf, tmp_path, name):
    _, out = convert_and_back(hf[name], "whisper", tmp_path, whisper_source=str(hf[name]))
    assert_bit_exact(tensors(hf[name]), tensors(out))
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()

    original = tr.WhisperForConditionalGeneration.from_pretrained(hf[name]).eval()
    exported, info = tr.WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    features = torch.randn(2, 16, 60, generator=torch.Generator().manual_seed(2)).to(original.dtype)
    decoder_ids = torch.tensor([[WHISPER_DECODER_START, 5, 9], [WHISPER_DECODER_START, 7, 4]])
    with torch.no_grad():
        a = original(input_features=features, decoder_input_ids=decoder_ids)
        b = exported.eval()(input_features=features, decoder_input_ids=decoder_ids)
    assert torch.equal(a.encoder_last_hidden_state, b.encoder_last_hidden_state)
    assert torch.equal(a.logits, b.logits)


def test_whisper_export_without_source_holds_the_encoder_only(hf, tmp_path):
    ckpt, out = convert_and_back(hf["whisper_f32"], "whisper", tmp_path)
    src = tensors(hf["whisper_f32"])
    assert_bit_exact({k: v for k, v in src.items() if k.startswith("model.encoder.")}, tensors(out))
    exported = tr.WhisperForConditionalGeneration.from_pretrained(out).eval()  # fresh decoder
    original = tr.WhisperForConditionalGeneration.from_pretrained(hf["whisper_f32"]).eval()
    features = torch.randn(1, 16, 60, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = original.model.encoder(features, output_hidden_states=True).hidden_states
        b = exported.model.encoder(features, output_hidden_states=True).hidden_states
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # The checkpoint's own files: metadata, tokenizer files per part.
    meta = checkpoint.read_meta(ckpt)
    assert meta["dtype"] == "float32" and meta["parts"]["whisper"]["source_dtype"] == "float32"
    assert (ckpt / "tokenizer/whisper/preprocessor_config.json").is_file()
    assert (out / "preprocessor_config.json").is_file()


def test_all_three_whisper_key_layouts_import_identically(hf, tmp_path):
    stored = {}
    for name in ("whisper_f32", "whisper_model", "whisper_encoder"):
        checkpoint.import_hf(tmp_path / name, whisper=str(hf[name]))
        stored[name] = ocp.StandardCheckpointer().restore((tmp_path / name / "params").absolute())
    ref = jax.tree.leaves(stored["whisper_f32"])
    for name in ("whisper_model", "whisper_encoder"):
        assert all(np.array_equal(a, b) for a, b in zip(ref, jax.tree.leaves(stored[name]), strict=True))


def test_whisper_source_saved_as_whisper_model_is_renamed_to_conditional_generation(hf, tmp_path):
    # The WhisperModel folder holds the same weights as whisper_f32 under "encoder."/"decoder.".
    _, out = convert_and_back(hf["whisper_model"], "whisper", tmp_path, whisper_source=str(hf["whisper_model"]))
    assert_bit_exact(tensors(hf["whisper_f32"]), tensors(out))


def abstract_state(part, hf_config):
    if part == "llm":
        cfg = qwen3.Qwen3Config.from_hf(hf_config)
        return nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3ForCausalLM(cfg, ModelOptions(), nnx.Rngs(0))))
    cfg = whisper.WhisperEncoderConfig.from_hf(hf_config)
    return nnx.split(nnx.eval_shape(lambda: whisper.WhisperEncoder(cfg, ModelOptions(), nnx.Rngs(0))))


def test_plain_orbax_restores_both_parts_and_load_params_feeds_the_model(hf, tmp_path):
    ckpt = tmp_path / "ckpt"
    checkpoint.import_hf(ckpt, whisper=str(hf["whisper_f32"]), llm=str(hf["llm_bf16_sharded"]))
    meta = checkpoint.read_meta(ckpt)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {}
    for part in ("whisper", "llm"):
        _, state = abstract_state(part, meta["parts"][part]["hf_config"])
        target[part] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                    nnx.to_pure_dict(state))
    restored = ocp.StandardCheckpointer().restore((ckpt / "params").absolute(), target)
    src = tensors(hf["llm_bf16_sharded"])
    up = restored["llm"]["layers"]["mlp"]["up_proj"]["weight"]
    for i in range(3):
        hf_up = src[f"model.layers.{i}.mlp.up_proj.weight"].float().numpy()
        assert np.array_equal(np.asarray(up[i]), hf_up)
    # Stacked arrays are chunked one layer at a time, so export can read a single layer.
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{ckpt}/params/",
                                          "path": "llm.layers.mlp.up_proj.weight/"}}
    assert ts.open(spec).result().chunk_layout.read_chunk.shape[0] == 1

    # load_params -> the nnx model matches transformers on the same weights (float32 compute).
    graphdef, state = abstract_state("llm", meta["parts"]["llm"]["hf_config"])
    nnx.replace_by_pure_dict(state, checkpoint.load_params(ckpt, "llm", state))
    model = nnx.merge(graphdef, state)
    ids = np.random.default_rng(4).integers(0, 96, (2, 7))
    ours, _ = model(model.embed(ids), np.broadcast_to(np.arange(7), (2, 7)))
    reference = tr.Qwen3ForCausalLM.from_pretrained(hf["llm_bf16_sharded"], dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-6, rtol=0)  # reached: 1.0e-7 max-abs


def test_export_reads_params_saved_by_plain_orbax(hf, tmp_path):
    """E.g. a training checkpoint: Orbax's own chunking (whole arrays), C order, zstd."""
    ckpt = tmp_path / "ckpt"
    checkpoint.import_hf(ckpt, llm=str(hf["llm_bf16_sharded"]))
    params = ocp.StandardCheckpointer().restore((ckpt / "params").absolute())
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    (resaved / "jaxmusic.json").write_text((ckpt / "jaxmusic.json").read_text())
    with ocp.StandardCheckpointer() as saver:
        saver.save((resaved / "params").absolute(), params)
    checkpoint.export_hf(resaved, tmp_path / "out", "llm")
    assert_bit_exact(tensors(hf["llm_bf16_sharded"]), tensors(tmp_path / "out"))


def test_load_params_refuses_a_model_of_another_size(hf, tmp_path):
    ckpt = tmp_path / "ckpt"
    checkpoint.import_hf(ckpt, llm=str(hf["llm_f32"]))
    bigger = qwen3_config().to_dict() | {"num_hidden_layers": 4}
    _, state = abstract_state("llm", bigger)
    with pytest.raises(checkpoint.ConversionError, match=r"llm\.layers\.mlp\.up_proj\.weight"):
        checkpoint.load_params(ckpt, "llm", state)


# --------------------------------------------------------------------------- command line

def run(script, *args):
    return subprocess.run([sys.executable, str(REPO / "convert" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_round_trip_prints_one_summary_line_and_never_imports_torch(hf, tmp_path):
    code = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
            "try: runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    for argv in ([REPO / "convert/hf_to_jax.py", "--llm", hf["llm_f32"], "--out", ckpt],
                 [REPO / "convert/jax_to_hf.py", ckpt, "--out", out, "--part", "llm"]):
        r = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                           cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("converted 36 tensors, "), r.stdout
    assert (ckpt / "tokenizer/llm/tokenizer.json").is_file() and (out / "tokenizer.json").is_file()
    assert_bit_exact(tensors(hf["llm_f32"]), tensors(out))


def corrupt_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    edit(dst)
    return dst


def truncate(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def bad_header(folder):
    f = folder / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:9] = b"#"  # the JSON header's opening brace
    f.write_bytes(bytes(raw))


def mismatched_tensors(folder):
    from safetensors.torch import save_file
    t = load_file(folder / "model.safetensors")
    del t["model.norm.weight"]
    t["model.extra.weight"] = torch.zeros(3)
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(48, 31)
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})


def pickle_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def drop_shard(folder):
    next(folder.glob("model-00002-of-*.safetensors")).unlink()


ERRORS = {  # case: (source, edit, words the one-line message must contain)
    "nonexistent": ("llm_f32", None, ["no such folder"]),
    "pickle_only": ("llm_f32", pickle_only, ["pytorch_model.bin", "convert them to safetensors"]),
    "bad_header": ("llm_f32", bad_header, ["model.safetensors", "header is not JSON"]),
    "truncated": ("llm_f32", truncate, ["model.safetensors", "truncated"]),
    "missing_shard": ("llm_bf16_sharded", drop_shard,
                      ["model.safetensors.index.json lists shard model-00002-of-", "missing"]),
    "mismatched": ("llm_f32", mismatched_tensors,
                   ["3 problem(s)", "missing model.norm.weight", "unexpected model.extra.weight",
                    "model.layers.1.mlp.up_proj.weight has shape [48, 31], the config implies [48, 32]"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_cli_errors_are_one_line_and_write_nothing(hf, tmp_path, case):
    source, edit, words = ERRORS[case]
    folder = tmp_path / "missing" if edit is None else corrupt_copy(hf[source], tmp_path / "src", edit)
    r = run("hf_to_jax.py", "--llm", folder, "--out", tmp_path / "ckpt")
    assert r.returncode == 2  # a user error
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["src"] if edit else [])  # nothing written


def test_export_errors_are_one_line(hf, tmp_path):
    ckpt = tmp_path / "ckpt"
    checkpoint.import_hf(ckpt, llm=str(hf["llm_f32"]))
    cases = [((tmp_path / "nope", "--out", tmp_path / "o", "--part", "llm"), "not a jaxmusic checkpoint"),
             ((ckpt, "--out", tmp_path / "o", "--part", "whisper"), "has no 'whisper' part"),
             ((ckpt, "--out", ckpt, "--part", "llm"), "already exists")]
    for args, word in cases:
        r = run("jax_to_hf.py", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and word in lines[0], r.stderr
    assert not (tmp_path / "o").exists()
