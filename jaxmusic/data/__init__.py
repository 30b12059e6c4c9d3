"""Training data: MuFun manifests -> grain pipeline -> fixed-shape, packable, resumable batches.

See `pipeline` for the stages, determinism, resume and bad-data rules, `packing` for the
batch layout the model consumes, and `check` for `jaxmusic data check`.
"""

from jaxmusic.data.manifest import BAD_DATA, BUDGET, SKIP_REASONS, ManifestError, ManifestSource
from jaxmusic.data.packing import BatchShape, assemble_batch, segment_attention_mask
from jaxmusic.data.pipeline import (DataConfig, DataError, format_report, iterator_report,
                                    make_dataset, report_from_state)

__all__ = ["BAD_DATA", "BUDGET", "SKIP_REASONS", "ManifestError", "ManifestSource", "BatchShape",
           "assemble_batch", "segment_attention_mask", "DataConfig", "DataError",
           "format_report", "iterator_report", "make_dataset", "report_from_state"]
