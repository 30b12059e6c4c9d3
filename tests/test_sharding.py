"""The mesh and the logical-axis table (abstract meshes: no devices needed)."""

import logging
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxmusic import sharding as S
from jaxmusic.models.mufun import MuFun
from jaxmusic.models.qwen3 import Qwen3Config
from jaxmusic.models.whisper import WhisperEncoderConfig
from jaxmusic.models.mufun import MuFunConfig
from jaxmusic.nn import ModelOptions

REPO = Path(__file__).resolve().parents[1]


def mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), S.MESH_AXES)


def tiny_state():
    whisper = WhisperEncoderConfig(num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                                   encoder_ffn_dim=64, max_source_positions=30)
    llm = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg = MuFunConfig(fusion_layers=(0, 1, 2))
    return nnx.state(nnx.eval_shape(lambda: MuFun(whisper, llm, cfg, ModelOptions(), nnx.Rngs(0))))


def test_resolve_mesh_shape():
    assert S.resolve_mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
    assert S.resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 16) == (2, 4, 2)
    assert S.resolve_mesh_shape({"data": -1, "fsdp": 8}, 16) == (2, 8, 1)
    with pytest.raises(S.ShardingError, match="needs 4 devices, there are 8"):
        S.resolve_mesh_shape({"fsdp": 2, "tensor": 2}, 8)
    with pytest.raises(S.ShardingError, match="at most one -1"):
        S.resolve_mesh_shape({"fsdp": -1, "tensor": -1}, 8)
    with pytest.raises(S.ShardingError, match="8 devices do not divide by 3"):
        S.resolve_mesh_shape({"fsdp": -1, "tensor": 3}, 8)
    with pytest.raises(S.ShardingError, match="unknown mesh axes \\['pipeline'\\]"):
        S.resolve_mesh_shape({"pipeline": 2}, 8)


def test_logical_to_spec_rules_and_refusals(caplog):
    m = mesh(data=2, fsdp=4, tensor=2)
    assert S.logical_to_spec(("layers", "embed", "heads"), m) == P(None, "fsdp", "tensor")
    assert S.logical_to_spec(("microbatch", "batch", None), m) == P(None, ("data", "fsdp"), None)
    assert S.logical_to_spec(("vocab", "embed"), m) == P("tensor", "fsdp")
    # mesh axes of size 1 are left out
    assert S.logical_to_spec(("batch", "embed"), mesh(fsdp=1, data=4)) == P("data", None)
    with pytest.raises(S.ShardingError, match="mesh axis 'fsdp' would split both 'batch' and 'embed'"):
        S.logical_to_spec(("batch", "length", "embed"), m)
    with pytest.raises(S.ShardingError, match="mesh axis 'tensor' would split both 'heads' and 'mlp'"):
        S.logical_to_spec(("heads", "mlp"), m)
    with pytest.raises(S.ShardingError, match="logical axis 'nonsense' has no rule"):
        S.logical_to_spec(("embed", "nonsense"), m)
    with pytest.raises(S.ShardingError, match="2 logical axes"):
        S.logical_to_spec(("embed", "mlp"), m, (4, 4, 4))
    # a dimension the mesh axes do not divide is replicated (documented fallback), with a warning
    with caplog.at_level(logging.WARNING, logger="jaxmusic.sharding"):
        assert S.logical_to_spec(("embed", "mlp"), m, (6, 8), what="w") == P(None, "tensor")
    assert "w: dimension 0 (embed, size 6) is not divisible by fsdp = 4" in caplog.text


def test_state_shardings_of_the_model():
    m = mesh(data=1, fsdp=4, tensor=2)
    state = tiny_state()
    shardings = S.state_shardings(state, m)
    specs = {"/".join(p): s.spec for p, s in _flat(shardings).items()}
    assert len(specs) == len(list(nnx.to_flat_state(state)))  # every entry, constants included
    assert specs["llm/layers/self_attn/q_proj/weight"] == P(None, "tensor", "fsdp")
    assert specs["llm/layers/self_attn/o_proj/weight"] == P(None, "fsdp", "tensor")
    assert specs["llm/layers/mlp/down_proj/weight"] == P(None, "fsdp", "tensor")
    assert specs["llm/embed_tokens"] == P("tensor", "fsdp")
    assert specs["llm/lm_head/weight"] == P("tensor", "fsdp")
    assert specs["llm/layers/self_attn/q_norm/scale"] == P(None, None)
    assert specs["whisper/embed_positions"] == P(None, "fsdp")
    assert specs["whisper/conv2/weight"] == P("fsdp", "tensor", None)
    assert specs["connector/linear1/weight"] == P("tensor", "fsdp")
    # the stacked-layer axis is never split
    for path, spec in specs.items():
        if "/layers/" in path:
            assert spec[0] is None, path


def test_only_sharding_py_names_mesh_axes():
    offenders = []
    for path in (REPO / "jaxmusic").rglob("*.py"):
        if path.name == "sharding.py":
            continue
        if re.search(r"PartitionSpec\(|NamedSharding\(|\bMesh\(|jax\.make_mesh\(", path.read_text()):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders


def test_concrete_mesh_rows_and_global_arrays():
    m = S.make_mesh({"fsdp": -1}, jax.devices()[:1])
    assert dict(m.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert S.process_rows(m, 6) == slice(0, 6)
    assert S.data_parallel_size(m) == 1
    local = {"ids": np.arange(12, dtype=np.int32).reshape(2, 6, 1)}
    out = S.to_global(m, local, {"ids": 6})
    np.testing.assert_array_equal(np.asarray(out["ids"]), local["ids"])
    assert out["ids"].sharding.spec == P(None, None, None)


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out
