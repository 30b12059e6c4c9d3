"""Batch layout and packing: constructed examples, the splice contract, no attention across samples."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmusic.models import mufun, splice_plan
from jaxmusic.data.config import DataConfig
from jaxmusic.data.packing import assemble_batch, segment_attention_mask
from jaxmusic.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from jaxmusic.nn import ModelOptions

IGN = splice_plan.IGNORE_INDEX
P = 300  # audio tokens per chunk
PAD = 99


def example(pieces, masks, chunks, audio_len=1000):
    """An example as the workers emit it (waveform features: one ramp per file, tagged by value)."""
    pieces = [np.asarray(p, np.int32) for p in pieces]
    masks = [np.asarray(m, bool) for m in masks]
    chunks = np.asarray(chunks, np.int32)
    audio = [np.full(audio_len, 10.0 * (i + 1) + len(pieces[0]), np.float32) for i in range(len(chunks))]
    return {"pieces": pieces, "loss_masks": masks, "chunks": chunks, "audio": audio,
            "length": int(sum(len(p) for p in pieces) + chunks.sum() * P)}


A = example([[1, 2, 3], [4, 5]], [[0, 0, 0], [1, 1]], [1])                         # 3 + 300 + 2 = 305
B = example([[6, 7], [8], [9, 10, 11]], [[0, 0], [0], [1, 1, 1]], [2, 1])          # 2 + 600 + 1 + 300 + 3 = 906
C = example([[12, 13, 14]], [[0, 1, 1]], [])                                       # text only: 3
CFG = DataConfig(seq_len=1400, chunks_per_row=4, features="waveform")
ROWS = 3


def assemble(rows):
    return assemble_batch(rows, CFG, batch_size=ROWS, tokens_per_chunk=P, pad_id=PAD)


def expected_row(parts):
    """Hand layout of one row: parts are ("t", ids, loss) or ("a", n_chunks) or ("start",)."""
    ids, labels, seg, pos, is_audio, audio_index = [], [], [], [], [], []
    segment, slot = 0, 0
    for part in parts:
        if part[0] == "start":
            segment += 1
            start = len(ids)
            continue
        if part[0] == "t":
            ids += part[1]
            labels += [t if l else IGN for t, l in zip(part[1], part[2])]
            is_audio += [False] * len(part[1])
            audio_index += [0] * len(part[1])
            n = len(part[1])
        else:
            n = part[1] * P
            ids += [PAD] * n
            labels += [IGN] * n
            is_audio += [True] * n
            audio_index += list(range(slot * P, slot * P + n))
            slot += part[1]
        seg += [segment] * n
        pos += list(range(len(pos) - start, len(pos) - start + n))
        labels[start] = IGN  # the first position of every sample carries no loss
    pad = CFG.seq_len - len(ids)
    return (ids + [PAD] * pad, labels + [IGN] * pad, seg + [0] * pad, pos + [0] * pad,
            is_audio + [False] * pad, audio_index + [0] * pad)


def test_packed_rows_are_laid_out_exactly():
    batch = assemble([[A, B], [C]])
    rows = [
        expected_row([("start",), ("t", [1, 2, 3], [0, 0, 0]), ("a", 1), ("t", [4, 5], [1, 1]),
                      ("start",), ("t", [6, 7], [0, 0]), ("a", 2), ("t", [8], [0]), ("a", 1),
                      ("t", [9, 10, 11], [1, 1, 1])]),
        expected_row([("start",), ("t", [12, 13, 14], [0, 1, 1])]),
        expected_row([]),
    ]
    names = ["input_ids", "labels", "segment_ids", "positions", "is_audio", "audio_index"]
    for k, name in enumerate(names):
        want = np.array([r[k] for r in rows])
        np.testing.assert_array_equal(batch[name], want, err_msg=name)
    # positions restart at 0 with each sample
    assert batch["positions"][0, 305] == 0 and batch["positions"][0, 304] == 304
    assert batch["segment_ids"][0, 304] == 1 and batch["segment_ids"][0, 305] == 2
    np.testing.assert_array_equal(batch["attention_mask"], np.array([r[2] for r in rows]) > 0)
    np.testing.assert_array_equal(batch["chunk_mask"], [1, 1, 1, 1] + [0] * 8)
    # audio: A's file in slot 0, B's first file (2 chunks) in slots 1-2, its second in slot 3
    assert batch["wave"].shape == (3 * 4, 480_000) and "mel" not in batch
    audio = batch["wave"].reshape(3, 4, 480_000)
    np.testing.assert_array_equal(audio[0, 0, :1000], A["audio"][0])
    assert not audio[0, 0, 1000:].any()
    np.testing.assert_array_equal(audio[0, 1, :1000], B["audio"][0])
    np.testing.assert_array_equal(audio[0, 3, :1000], B["audio"][1])
    assert not audio[0, 2].any() and not audio[1:].any()


def test_batch_feeds_the_splice():
    """Encoder output for chunk slot (b, c) lands exactly where the batch says, row by row."""
    batch = assemble([[A, B], [C]])
    b, c = ROWS, CFG.chunks_per_row
    # fake audio tokens: value = 1000 * (flat chunk slot) + token within the chunk
    tag = (1000 * np.arange(b * c)[:, None] + np.arange(P)[None, :]).astype(np.float32)
    spliced = mufun.splice(jnp.full((b, CFG.seq_len, 1), -1.0), jnp.asarray(tag)[..., None],
                           jnp.asarray(batch["audio_index"]), jnp.asarray(batch["is_audio"]), groups=b)
    got = np.asarray(spliced)[..., 0]
    # row 0: A's audio at 3..302 from slot 0; B's two chunks from slots 1, 2; its last file from slot 3
    np.testing.assert_array_equal(got[0, 3:303], tag[0])
    np.testing.assert_array_equal(got[0, 307:907], np.concatenate([tag[1], tag[2]]))
    np.testing.assert_array_equal(got[0, 908:1208], tag[3])
    assert (got[~batch["is_audio"]] == -1).all()


def test_segment_mask_is_same_segment_and_causal():
    seg = np.array([[1, 1, 2, 2, 2, 0]])
    mask = np.asarray(segment_attention_mask(seg))[0, 0]
    want = np.array([[1, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0],
                     [0, 0, 1, 0, 0, 0],
                     [0, 0, 1, 1, 0, 0],
                     [0, 0, 1, 1, 1, 0],
                     [0, 0, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(mask, want)


def test_no_attention_across_packed_samples():
    """Logits of a packed row equal the logits of each sample run alone (Qwen3ForCausalLM mask)."""
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = Qwen3ForCausalLM(cfg, ModelOptions(), nnx.Rngs(0))
    logits = nnx.jit(lambda m, x, pos, seg: m(x, pos, mask=segment_attention_mask(seg))[0])
    lengths = [5, 9, 3]
    length = sum(lengths) + 3  # + padding
    seg = np.concatenate([np.full(n, k + 1) for k, n in enumerate(lengths)] + [np.zeros(3, int)])[None]
    pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(3, int)])[None]
    embeds = jax.random.normal(jax.random.key(1), (1, length, 32))
    packed = logits(model, embeds, pos, seg)
    unmasked = logits(model, embeds, pos, np.ones_like(seg))
    start = 0
    for n in lengths:
        # the sample alone at the start of a row (what follows it cannot matter: causal)
        alone_x = jnp.zeros_like(embeds).at[:, :n].set(embeds[:, start:start + n])
        alone = logits(model, alone_x, np.arange(length)[None], np.ones_like(seg))[0, :n]
        # reached: 0.0 on CPU float32 (masked keys add exact zeros); the bound allows for
        # other backends reducing in another order
        np.testing.assert_allclose(packed[0, start:start + n], alone, atol=1e-5, rtol=0)
        if start:  # the test has teeth: without the mask later samples see earlier ones
            assert np.abs(unmasked[0, start:start + n] - alone).max() > 1e-3
        start += n
