"""Test-wide settings: offline, deterministic, quiet."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The plan extra installs JAX's CUDA plugin; without a GPU, JAX would try it first and log a
# traceback before falling back to the CPU. The tests run on the CPU (subprocesses inherit this).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# grain's multiprocessing reads absl flags; mark them parsed before anything imports it.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
