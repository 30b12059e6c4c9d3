"""Per-item records on disk: what makes an evaluation resumable and shardable over processes.

A run's `--out` folder holds `run.json` (checkpoint, benchmark, mode and judge: a folder holds one
run, so resumed records are comparable) and JSON-lines record files, one record per scored
item, appended and flushed batch by batch: `items.jsonl` for a single process, and
`items.process<P>.jsonl` for process P of a multi-process run, so that processes never write
to the same file. A record's `key` names its item (position and content digest).

Reading back (`read_records`) takes the union of every record file: a torn last line (a run
killed mid-write) is ignored, a later record of an item replaces an earlier one, except that a
`skipped` record (audio that could not be decoded) never replaces a scored one. Items with no
record, or with a `skipped` one, are scored again by a rerun; nothing else is.

Processes: process P of N scores the items `items[P*n//N:(P+1)*n//N]` of the benchmark's n,
a fixed block whatever has been scored already, so processes never score the same item even
when they started at different times, and a rerun on another process count still scores each
missing item once. When a process has scored its block it merges every record file into
`items.jsonl` (one record per item, in benchmark order; the per-process files stay, and are
read again on a rerun) and writes the results, under an exclusive lock, so the last process to
finish writes the complete results; process 0 first waits until every item has a record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

from jaxmusic.errors import UserError

MERGED = "items.jsonl"


def block(n_items: int, process: int, processes: int) -> slice:
    """The items process `process` of `processes` scores."""
    return slice(process * n_items // processes, (process + 1) * n_items // processes)


def open_record_file(out: Path, process: int, processes: int):
    """This process's record file, opened for appending after any torn last line."""
    path = out / (MERGED if processes == 1 else f"items.process{process}.jsonl")
    f = open(path, "a+", encoding="utf-8")
    if f.tell():
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":  # a run killed mid-write: its torn line must not swallow the next record
            f.write("\n")
    return f


def _better(old: dict | None, new: dict) -> bool:
    return old is None or new["status"] != "skipped" or old["status"] == "skipped"


def read_records(out: Path) -> dict[str, dict]:
    """The union of every record file in `out` (see the module docstring)."""
    records: dict[str, dict] = {}
    for path in [out / MERGED] + sorted(out.glob("items.process*.jsonl")):
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                key, _ = rec["key"], rec["status"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if _better(records.get(key), rec):
                records[key] = rec
    return records


def check_run(out: Path, run: dict) -> None:
    """An --out folder holds one run; refuse records of another (created by the first process)."""
    meta, tmp = out / "run.json", out / f".run.json.{os.getpid()}"
    tmp.write_text(json.dumps(run, indent=1))
    try:
        os.link(tmp, meta)  # appears whole, and only if no process has written it yet
    except FileExistsError:
        old = json.loads(meta.read_text())
        if old != run:
            raise UserError(f"{out} holds results of another run ({old}); pass a different --out") from None
    finally:
        tmp.unlink()


@contextlib.contextmanager
def merge_lock(out: Path) -> Iterator[None]:
    """One merge at a time (processes finishing together, on one machine or a shared filesystem)."""
    with open(out / ".merge.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_merged(out: Path, keys: Sequence[str], records: dict[str, dict]) -> None:
    """`items.jsonl` = one record per item, in benchmark order (atomically). The per-process
    files stay: another process may still be appending to its own."""
    tmp = out / f".{MERGED}.tmp-{os.getpid()}"
    wanted = set(keys)
    extra = [k for k in records if k not in wanted]  # records of items a --limit leaves out
    with open(tmp, "w", encoding="utf-8") as f:
        for key in list(keys) + extra:
            if key in records:
                f.write(json.dumps(records[key], ensure_ascii=False) + "\n")
    os.replace(tmp, out / MERGED)
