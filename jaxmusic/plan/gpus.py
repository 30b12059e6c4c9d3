"""GPU models and clusters to plan for, and their devices without a GPU.

A `Gpu` comes from `jaxmusic/configs/gpus.yaml` (`--gpu NAME`) or a file of one entry in the
same format (`--gpu-spec FILE`). `cluster_devices` turns it into the devices of a cluster of
`nodes x gpus_per_node` of them through JAX's topology API: XLA's GPU compiler targets them
from the device description written here (a `GpuTargetConfigProto`), no GPU present.

Nothing here imports JAX at module level: `jaxmusic plan --xla-flags` (called by
launch/slurm.sbatch on every start) stays instant.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import os
import shlex
from pathlib import Path

import yaml

from jaxmusic.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GPUS_FILE = CONFIGS / "gpus.yaml"
XLA_FLAGS_FILE = CONFIGS / "xla_gpu.yaml"
JAX_DEFAULT_FRACTION = 0.75  # JAX preallocates 75% of a GPU's memory unless told otherwise


class PlanError(UserError, ValueError):
    """A plan request that cannot be carried out (unknown GPU, missing package, bad spec)."""


@dataclasses.dataclass(frozen=True)
class Gpu:
    key: str                        # gpus.yaml key, e.g. a100-40gb
    name: str                       # the device name a real one reports
    compute_capability: tuple[int, int]
    feature_extension: str          # NONE, or ACCELERATED_FEATURES (sm_90a)
    device: dict                    # gpu_device_info fields
    cudnn: tuple[int, int, int]
    peak_tflops: float              # dense bf16
    nvlink_gbps: float              # one GPU's NVLink bandwidth, one direction, GB/s
    network_gbps: float             # one GPU's share of the network, one direction, GB/s
    memory_fraction: float          # XLA's pool as a share of the device memory

    @property
    def memory_bytes(self) -> int:
        return int(self.device["device_memory_size"])

    @property
    def hbm_bytes_per_s(self) -> float:
        return float(self.device["memory_bandwidth"])

    @property
    def pool_bytes(self) -> int:
        """What XLA's allocator may hand out on one device."""
        return int(self.memory_bytes * self.memory_fraction)

    def with_overrides(self, **values) -> "Gpu":
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise PlanError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a mapping")
    return data


def known_gpus() -> list[str]:
    return sorted(_read(GPUS_FILE)["gpus"])


def _gpu(key: str, entry: dict, table: dict, where: str) -> Gpu:
    need = ("name", "compute_capability", "device", "peak_tflops", "nvlink_gbps", "network_gbps")
    missing = [k for k in need if k not in entry]
    if missing:
        raise PlanError(f"{where}: GPU {key!r} lacks {missing} (see {GPUS_FILE} for the format)")
    if "device_memory_size" not in entry["device"] or "memory_bandwidth" not in entry["device"]:
        raise PlanError(f"{where}: GPU {key!r}: device needs device_memory_size and memory_bandwidth")
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", entry.get("memory_fraction", JAX_DEFAULT_FRACTION))
    try:
        return Gpu(key=key, name=str(entry["name"]), compute_capability=tuple(entry["compute_capability"]),
                   feature_extension=str(entry.get("feature_extension", "NONE")),
                   device={**table["common_device"], **entry["device"]},
                   cudnn=tuple(entry.get("cudnn", table["cudnn"])), peak_tflops=float(entry["peak_tflops"]),
                   nvlink_gbps=float(entry["nvlink_gbps"]), network_gbps=float(entry["network_gbps"]),
                   memory_fraction=float(fraction))
    except (TypeError, ValueError) as e:
        raise PlanError(f"{where}: GPU {key!r}: {e}") from None


def load_gpu(name: str | None = None, spec_file: str | None = None) -> Gpu:
    """The GPU named in gpus.yaml, or the one entry of `spec_file` (JAX's 75% pool by default:
    `memory_fraction` in the file or XLA_PYTHON_CLIENT_MEM_FRACTION set it)."""
    table = _read(GPUS_FILE)
    if spec_file:
        entry = _read(Path(spec_file))
        return _gpu(entry.get("key", Path(spec_file).stem), entry, table, spec_file)
    key = (name or "").lower()
    if key not in table["gpus"]:
        raise PlanError(f"unknown GPU {name!r}; known: {', '.join(sorted(table['gpus']))} "
                        "(or describe one with --gpu-spec FILE)")
    return _gpu(key, table["gpus"][key], table, str(GPUS_FILE))


def target_config(gpu: Gpu) -> str:
    """The `stream_executor.GpuTargetConfigProto` text XLA compiles for."""
    def scalar(v):
        return repr(v) if isinstance(v, float) else str(v)

    major, minor = gpu.compute_capability
    info = "\n".join(f"  {k}: {scalar(v)}" for k, v in gpu.device.items())
    dnn = dict(zip(("major", "minor", "patch"), gpu.cudnn))
    return (f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{ major: {major} minor: {minor} "
            f"feature_extension: {gpu.feature_extension} }}\n}}\n"
            f'platform_name: "CUDA"\n'
            f"dnn_version_info {{ {' '.join(f'{k}: {v}' for k, v in dnn.items())} }}\n"
            f'device_description_str: "{gpu.name}"\n')


def xla_flags() -> list[str]:
    """The GPU runs' XLA flags (`jaxmusic/configs/xla_gpu.yaml`)."""
    return [str(f) for f in _read(XLA_FLAGS_FILE)["flags"]]


def _typed(value: str) -> bool | int | str:
    if value in ("true", "false"):
        return value == "true"
    return int(value) if value.lstrip("-").isdigit() else value


def compiler_options(env_flags: str | None = None) -> dict[str, bool | int | str]:
    """`xla_gpu.yaml`'s flags, then those of XLA_FLAGS (later wins), as `compile()` options."""
    env_flags = os.environ.get("XLA_FLAGS", "") if env_flags is None else env_flags
    options = {}
    for flag in xla_flags() + shlex.split(env_flags):
        name, _, value = flag.lstrip("-").partition("=")
        if name.startswith("xla_gpu_"):  # host-platform flags (device counts) do not apply
            options[name] = _typed(value)
    return options


def load_cudnn() -> None:
    """Make cuDNN findable for JAX's fused-attention checks, which read its version at trace time.

    JAX's CUDA plugin loads `nvidia-cudnn-cu12` itself; the plan extra installs the much smaller
    `nvidia-cudnn-jit-cu12`, whose library lives in a folder the plugin does not search.
    """
    for module in ("cudnn", "cudnn_jit"):
        try:
            folder = Path(importlib.import_module(f"nvidia.{module}").__path__[0]) / "lib"
        except ImportError:
            continue
        if (folder / "libcudnn.so.9").is_file():
            ctypes.CDLL(str(folder / "libcudnn.so.9"))
            return
    raise PlanError("cuDNN is not installed: pip install -e '.[plan]' (the plan compiles cuDNN attention)")


def cluster_devices(gpu: Gpu, nodes: int, gpus_per_node: int):
    """The `nodes x gpus_per_node` devices of a cluster of `gpu`s, ordered as one process per
    GPU would see them (node by node)."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always has it
        raise PlanError(f"this JAX has no topology API ({e})") from None
    try:
        importlib.import_module("jax_plugins.xla_cuda12")
    except ImportError:
        raise PlanError("JAX's CUDA plugin is not installed: pip install -e '.[plan]'") from None
    load_cudnn()
    topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(gpu),
                                            topology=f"1x{nodes}x{gpus_per_node}")
    return sorted(topology.devices, key=lambda d: (d.process_index, d.id))
