"""How a model's parameters correspond to Hugging Face tensors.

Each model file declares a list of `HFTensor`s next to its definition. Every parameter is
stored exactly as its HF tensor is laid out (Linear weights `[out, in]`, Conv1d weights
`[out, in, width]`), so an HF tensor is one of our arrays, or one layer of a stacked one,
byte for byte. The streaming converters (`jaxmusic.checkpoints`) walk the list one tensor
at a time; `load_hf_weights` / `hf_weights` do the same in memory, for small models and tests.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class HFTensor:
    path: tuple[str, ...]  # path in the model's NNX state, e.g. ("layers", "mlp", "up_proj", "weight")
    hf_key: str            # HF name; "{i}" stands for the layer index when `stacked`
    stacked: bool = False  # one HF tensor per layer, stacked on our leading axis

    def hf_keys(self, n_layers: int) -> list[str]:
        return [self.hf_key.format(i=i) for i in range(n_layers)] if self.stacked else [self.hf_key]


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def load_hf_weights(module, specs: list[HFTensor], get, n_layers: int) -> None:
    """Copy HF tensors (fetched by `get(hf_key) -> np.ndarray`) into `module`, in memory."""
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(module)
    for spec in specs:
        param = _get_path(state, spec.path)
        parts = [np.asarray(get(k)) for k in spec.hf_keys(n_layers)]
        value = np.stack(parts) if spec.stacked else parts[0]
        if value.shape != param.shape:
            raise ValueError(f"{spec.hf_key}: shape {value.shape} does not fit {spec.path} {param.shape}")
        param.set_value(jnp.asarray(value, dtype=param.dtype))
    nnx.update(module, state)


def hf_weights(module, specs: list[HFTensor], n_layers: int) -> dict[str, np.ndarray]:
    """The module's parameters as HF-named NumPy tensors, in memory."""
    from flax import nnx

    state = nnx.state(module)
    out = {}
    for spec in specs:
        value = np.asarray(_get_path(state, spec.path)[...])
        for i, key in enumerate(spec.hf_keys(n_layers)):
            out[key] = np.ascontiguousarray(value[i] if spec.stacked else value)
    return out
