"""Training metrics: analytic FLOPs and MFU, JSONL and TensorBoard writers, progress bar.

FLOP count (`step_flops`): matrix multiplications only, 2 FLOPs per multiply-add, for the
padded shapes the step actually runs (as MaxText counts). Per 30 s chunk row, with
T = max_source_positions, d = d_model, f = FFN width, m = mel bins, n = encoder layers:

    encoder    2 (2T)(3m)d + 2T(3d)d  +  n [ 2T(4d^2) + 4T^2 d + 2T(2df) ]
    connector  2P (c_in c_hid + c_hid D)            P pooled tokens per chunk

and per row of L tokens, with D = hidden, Q = heads x head_dim, K = kv_heads x head_dim,
M = MLP width, V = vocabulary, N layers (causal attention counts the half it computes):

    LLM        N [ 2L(DQ + 2DK + QD + 3DM) + 2 L^2 Q ]  +  2LDV

A GRPO update runs P prompt rows of L tokens without logits, then its completion rows of
L' tokens over the prompt's cache: N [ 2L'(DQ + 2DK + QD + 3DM) + 4 L' (L + L'/2) Q ] + 2L'DV
each (`jaxmusic.losses.completion_log_probs`).

A training step costs forward + backward. The backward of a part costs 2x its forward if
it has trainable parameters (input and weight gradients), 1x if it is frozen but a part
before it is trainable (input gradients only), and nothing otherwise. Rematerialisation
is not counted (MFU, not hardware utilisation).

MFU = step FLOPs / (step time x devices x peak FLOP/s per device), with the dense bf16
peaks in `PEAK_FLOPS` (or `log.peak_tflops`); absent on CPUs.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path

from jaxmusic.models.qwen3 import Qwen3Config
from jaxmusic.models.whisper import WhisperEncoderConfig
from jaxmusic.models.mufun import MuFunConfig

# Dense bfloat16 tensor-core peak per device, FLOP/s (vendor data sheets, no sparsity).
PEAK_FLOPS = {"a100": 312e12, "h100 pcie": 756e12, "h100": 989e12, "h200": 989e12, "b200": 2250e12}


def peak_flops(device_kind: str, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    kind = device_kind.lower()
    for name, value in PEAK_FLOPS.items():  # most specific names first
        if name in kind:
            return value
    return None


def forward_flops(whisper: WhisperEncoderConfig, llm: Qwen3Config, mufun: MuFunConfig, *,
                  chunk_rows: int, rows: int, length: int,
                  completions: tuple[int, int] | None = None) -> dict[str, float]:
    """Forward matmul FLOPs of each part for one microbatch (see the module docstring);
    `completions` (rows, length): a GRPO update's, whose prompts are the `rows`."""
    t, d, f, m = whisper.max_source_positions, whisper.d_model, whisper.encoder_ffn_dim, whisper.num_mel_bins
    enc = 2 * (2 * t) * (3 * m) * d + 2 * t * (3 * d) * d
    enc += whisper.encoder_layers * (2 * t * 4 * d * d + 4 * t * t * d + 2 * t * 2 * d * f)
    widths = mufun.connector_dims(d, llm.hidden_size)
    conn = 2 * mufun.tokens_per_chunk(t) * sum(a * b for a, b in zip(widths, widths[1:]))
    big_d, q = llm.hidden_size, llm.num_attention_heads * llm.head_dim
    k, big_m, n = llm.num_key_value_heads * llm.head_dim, llm.intermediate_size, llm.num_hidden_layers
    dense = 2 * (big_d * q + 2 * big_d * k + q * big_d + 3 * big_d * big_m)  # per token and layer
    logits = 2 * big_d * llm.vocab_size  # per token
    if completions is None:
        lm = rows * (n * (dense * length + 2 * length * length * q) + logits * length)
    else:
        c_rows, c_len = completions
        lm = rows * n * (dense * length + 2 * length * length * q)
        lm += c_rows * (n * (dense * c_len + 4 * c_len * (length + c_len / 2) * q) + logits * c_len)
    return {"whisper": float(chunk_rows * enc), "connector": float(chunk_rows * conn), "llm": float(lm)}


def step_flops(forward: dict[str, float], trainable_parts: set[str], microbatches: int) -> float:
    """Forward + backward FLOPs of a whole step (parts in data-flow order)."""
    total, upstream_trainable = 0.0, False
    for part in ("whisper", "connector", "llm"):
        fwd = forward[part]
        trains = part in trainable_parts
        total += fwd * (3 if trains else 2 if upstream_trainable else 1)
        upstream_trainable |= trains
    return total * microbatches


# ----------------------------------------------------------------------------- writers

class JsonlWriter:
    def __init__(self, path: Path):
        self._file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
    """A `tensorflow.Event` protobuf, encoded by hand (fields: wall_time 1, step 2,
    file_version 3, summary 5 -> Summary.value 1 -> {tag 1, simple_value 2})."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _field(3, 2, file_version.encode())
    if scalars:
        values = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
                          for tag, v in scalars.items())
        msg += _field(5, 2, values)
    return msg


class TensorBoardWriter:
    """Scalar summaries in a TensorBoard event file (TFRecord of Event protos)."""

    def __init__(self, logdir: Path):
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(logdir / name, "ab")
        self._record(_event(time.time(), 0, file_version="brain.Event:2"))

    def _record(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + data
                         + struct.pack("<I", _masked_crc(data)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._record(_event(time.time(), step, scalars=values))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_tfrecords(path: Path) -> list[bytes]:
    """Records of a TFRecord file, checksums verified (for tests and tooling)."""
    data, out, pos = Path(path).read_bytes(), [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != _masked_crc(header):
            raise ValueError(f"{path}: bad length checksum at byte {pos}")
        body = data[pos + 12:pos + 12 + length]
        if struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] != _masked_crc(body):
            raise ValueError(f"{path}: bad data checksum at byte {pos}")
        out.append(body)
        pos += 16 + length
    return out
