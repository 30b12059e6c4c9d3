"""How a model's parameters correspond to Hugging Face tensors.

Each model file declares a list of `HFTensor`s next to its definition; the
converters in `convert/` walk that list, one tensor at a time, to stream
checkpoints in either direction without holding a whole model in memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Layouts: how an HF (PyTorch) tensor is rearranged into ours.
SAME = "same"      # identical shape
LINEAR = "linear"  # torch Linear weight [out, in] -> kernel [in, out] (the connector's)
CONV1D = "conv1d"  # torch Conv1d weight [out, in, width] -> kernel [width, in, out]


@dataclasses.dataclass(frozen=True)
class HFTensor:
    path: tuple[str, ...]  # path in the model's NNX state, e.g. ("layers", "mlp", "up_proj", "weight")
    hf_key: str            # HF name; "{i}" stands for the layer index when `stacked`
    layout: str = SAME
    stacked: bool = False  # one HF tensor per layer, stacked on our leading axis

    def hf_keys(self, n_layers: int) -> list[str]:
        return [self.hf_key.format(i=i) for i in range(n_layers)] if self.stacked else [self.hf_key]


def to_ours(layout: str, hf: np.ndarray) -> np.ndarray:
    if layout == SAME:
        return hf
    if layout == LINEAR:
        return hf.T
    if layout == CONV1D:
        return hf.transpose(2, 1, 0)
    raise ValueError(f"unknown layout {layout!r}")


def to_hf(layout: str, ours: np.ndarray) -> np.ndarray:
    if layout == SAME:
        return ours
    if layout == LINEAR:
        return ours.T
    if layout == CONV1D:
        return ours.transpose(2, 1, 0)
    raise ValueError(f"unknown layout {layout!r}")


def hf_shape(layout: str, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the HF tensor (one layer's, for stacked params) given ours (one layer's)."""
    if layout == SAME:
        return tuple(our_shape)
    if layout == LINEAR:
        return tuple(our_shape[::-1])
    if layout == CONV1D:
        return (our_shape[2], our_shape[1], our_shape[0])
    raise ValueError(f"unknown layout {layout!r}")


def _get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def load_hf_weights(module, specs: list[HFTensor], get, n_layers: int) -> None:
    """Copy HF tensors (fetched by `get(hf_key) -> np.ndarray`) into `module`, in memory.

    For small models and tests; `convert/` streams large checkpoints instead.
    """
    from flax import nnx
    import jax.numpy as jnp

    state = nnx.state(module)
    for spec in specs:
        param = _get_path(state, spec.path)
        parts = [to_ours(spec.layout, np.asarray(get(k))) for k in spec.hf_keys(n_layers)]
        value = np.stack(parts) if spec.stacked else parts[0]
        if value.shape != param.shape:
            raise ValueError(f"{spec.hf_key}: shape {value.shape} does not fit {spec.path} {param.shape}")
        param.set_value(jnp.asarray(value, dtype=param.dtype))
    nnx.update(module, state)


def hf_weights(module, specs: list[HFTensor], n_layers: int) -> dict[str, np.ndarray]:
    """The module's parameters as HF-named NumPy tensors, in memory (small models, tests)."""
    from flax import nnx

    state = nnx.state(module)
    out = {}
    for spec in specs:
        value = np.asarray(_get_path(state, spec.path)[...])
        for i, key in enumerate(spec.hf_keys(n_layers)):
            out[key] = np.ascontiguousarray(to_hf(spec.layout, value[i] if spec.stacked else value))
    return out
