"""Per-sample loss logs: one parquet row per sample visit, written off the training thread.

Layout (hive partitioning, so ``pyarrow.dataset``, pandas, polars and duckdb read the whole
directory as one table with ``round``, ``split`` and ``rank`` columns)::

    loss_logs/round=R/split=train|eval/rank=K/part-NNNNN.parquet

Columns in the files: ``sample_id, epoch, step, n_tokens, ce_sum, kl_sum, loss_sum,
top1_agree`` (positions where the student's argmax is the teacher's top-1), ``topk_mass_sum``
(teacher probability captured by the top-k) and ``teacher_entropy_sum`` (teacher entropy over
the top-k support): sums over the sample's valid positions, in nats where they are losses. The
partition keys are not repeated inside the files, so readers do not see them twice.

A run directory on a store (``s3://...``): each part is one PUT of the whole file under its
final name (a PUT is atomic: a reader sees the whole part or none); the part number comes from
listing the rank's prefix (one writer per prefix).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.errors import writing
from pipeline.storage import Remote, is_remote

SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("epoch", pa.int32()), ("step", pa.int64()), ("n_tokens", pa.int32()),
    ("ce_sum", pa.float32()), ("kl_sum", pa.float32()), ("loss_sum", pa.float32()),
    ("top1_agree", pa.int32()), ("topk_mass_sum", pa.float32()), ("teacher_entropy_sum", pa.float32()),
])


def unreadable_part(part: str | os.PathLike, err: Exception) -> str:
    """The one-line message for a loss-log part file that is not readable parquet (named)."""
    return (f"loss-log part {part} is not readable parquet ({' '.join(str(err).split())}); "
            f"restore it, or delete it to drop its rows")


class LossLogWriter:
    """Buffers rows per (round, split) and writes part files on a background thread.

    Args:
        log_dir: ``<run_dir>/loss_logs`` (a local path or a URL).
        rank: this process's rank (its own directory: no two writers share a file).
        flush_rows: rows buffered per (round, split) before a part file is written.
    """

    def __init__(self, log_dir: str | os.PathLike, rank: int, flush_rows: int = 65536):
        self.remote = Remote(log_dir) if is_remote(log_dir) else None
        self.dir = Path(log_dir) if self.remote is None else None
        self.rank, self.flush_rows = rank, flush_rows
        self.buffers: dict[tuple[int, str], dict[str, list]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loss-log")
        self.pending: list[Future] = []

    def append(self, round_: int, split: str, epoch: int, step: int, rows: dict[str, list]) -> None:
        """Add rows (dict of equal-length lists keyed by column name, without epoch/step)."""
        n = len(rows.get("sample_id", []))
        if n == 0:
            return
        buf = self.buffers.setdefault((round_, split), {name: [] for name in SCHEMA.names})
        buf["epoch"].extend([epoch] * n)
        buf["step"].extend([step] * n)
        for name in SCHEMA.names:
            if name not in ("epoch", "step"):
                buf[name].extend(rows[name])
        if len(buf["sample_id"]) >= self.flush_rows:
            self._submit(round_, split)

    def _submit(self, round_: int, split: str) -> None:
        buf = self.buffers.pop((round_, split), None)
        if buf and buf["sample_id"]:
            table = pa.table(buf, schema=SCHEMA)
            self.pending.append(self.pool.submit(self._write, round_, split, table))

    def _write(self, round_: int, split: str, table: pa.Table) -> None:
        if self.remote is not None:
            prefix = f"round={round_}/split={split}/rank={self.rank}"
            n = len([x for x in Remote(self.remote.url_of(prefix)).names() if x.startswith("part-")])
            name = f"{prefix}/part-{n:05d}.parquet"
            with writing("loss-log part", self.remote.url_of(name)):
                self.remote.write_bytes(name, _parquet_bytes(table))
            return
        d = self.dir / f"round={round_}" / f"split={split}" / f"rank={self.rank}"
        d.mkdir(parents=True, exist_ok=True)
        n = len(list(d.glob("part-*.parquet")))
        final = d / f"part-{n:05d}.parquet"
        tmp = d / f".part-{n:05d}.parquet.tmp"
        with writing("loss-log part", final, tmp):
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, final)

    def truncate_after(self, round_: int, step: int) -> None:
        """Drop this rank's rows of ``round_`` logged after optimizer step ``step`` (used on
        resume from the checkpoint of ``step``, so that no visit is logged twice)."""
        import pyarrow.compute as pc

        if self.remote is not None:
            return self._truncate_remote(round_, step)
        for part in sorted((self.dir / f"round={round_}").glob(f"split=*/rank={self.rank}/part-*.parquet")):
            try:
                table = pq.read_table(part)
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(unreadable_part(part, e) + ", and resume again") from None
            if table.num_rows and pc.max(table["step"]).as_py() > step:
                kept = table.filter(pc.less_equal(table["step"], step))
                tmp = part.with_name("." + part.name + ".tmp")
                with writing("loss-log part", part, tmp):  # the part stays whole until the rename
                    pq.write_table(kept, tmp, compression="zstd")
                    os.replace(tmp, part)

    def _truncate_remote(self, round_: int, step: int) -> None:
        import io

        import pyarrow.compute as pc

        base = self.remote.url_of(f"round={round_}")
        found = Remote(base).files("") if self.remote.exists(f"round={round_}") else {}
        for rel in sorted(f for f in found if f"/rank={self.rank}/part-" in f"/{f}" and f.endswith(".parquet")):
            name = f"round={round_}/{rel}"
            try:
                table = pq.read_table(io.BytesIO(self.remote.read_bytes(name)))
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(unreadable_part(self.remote.url_of(name), e) + ", and resume again") from None
            if table.num_rows and pc.max(table["step"]).as_py() > step:
                with writing("loss-log part", self.remote.url_of(name)):  # one PUT: whole old or whole new
                    self.remote.write_bytes(name, _parquet_bytes(table.filter(pc.less_equal(table["step"], step))))

    def flush(self) -> None:
        """Write every buffered row and wait until all part files are closed."""
        for key in list(self.buffers):
            self._submit(*key)
        for f in self.pending:
            f.result()
        self.pending.clear()

    def close(self) -> None:
        self.flush()
        self.pool.shutdown(wait=True)


def _parquet_bytes(table: pa.Table) -> bytes:
    """A whole zstd parquet file in memory (one PUT to a store)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
