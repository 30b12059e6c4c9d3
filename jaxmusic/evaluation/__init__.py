"""Evaluation: `jaxmusic eval` and its parts.

* `evaluate`: the command, the model calls (generate, loglik) and the rule-based letter extractor;

* `benchmarks`: benchmark files -> `Item`s: jaxmusic's JSONL, and MuCUE as published on the
  Hugging Face Hub (a snapshot folder of parquet files, audio embedded), read as it is;
* `judge`: letter extraction by a Qwen3 judge, as MuCUE-Bench scores answers;
* `records`: per-item records on disk, shared by the processes of a run and read back on resume;
* `report`: per-subset table, macro and micro averages, the published MuCUE rows, the chart.
"""
