"""Per-sample loss logs: one parquet row per sample visit, written off the training thread.

Layout (hive partitioning, so ``pyarrow.dataset``, pandas, polars and duckdb read the whole
directory as one table with ``round``, ``split`` and ``rank`` columns)::

    loss_logs/round=R/split=train|eval/rank=K/part-<attempt>-NNNNN.parquet

Part names are never reused: ``<attempt>`` (UTC start time and a random suffix) is new for
every writer, ``NNNNN`` counts its parts. A part deleted by hand therefore never makes a later
part overwrite another one.

Columns in the files: ``sample_id, epoch, step, n_tokens, ce_sum, kl_sum`` (forward KL),
``distill_sum`` (the configured ``loss.divergence``; ``kl_sum`` for forward KL), ``loss_sum,
top1_agree`` (positions where the student's argmax is the teacher's top-1), ``topk_mass_sum``
(the teacher's probability mass on the cached ids) and ``teacher_entropy_sum`` (the teacher's
entropy over the cached ids plus one tail outcome), both as
:func:`pipeline.numerics.position_stats` defines them for ``inspect-cache`` too: sums over the
sample's valid positions, in nats where they are losses. Cross-tokenizer runs add
``aligned_frac`` (the fraction of the sample's valid positions aligned with a teacher position)
and ``mapped_mass`` (the mean, over those aligned positions, of the teacher probability on ids
that have a student id); both are null in other runs and in logs written before they existed.
The partition keys are not repeated inside the files, so readers do not see them twice.

A run directory on a store (``s3://...``): each part is one PUT of the whole file under its
final name (a PUT is atomic: a reader sees the whole part or none).

Resuming (:meth:`LossLogWriter.truncate_after`) drops the rows logged after the step resumed
from, in the files of every rank the run ever had, whatever the new world size: rank ``r`` of
``W`` trims the directories ``rank=K`` with ``K % W == r``.
"""
from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage.errors import writing
from pipeline.storage import Folder

SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("epoch", pa.int32()), ("step", pa.int64()), ("n_tokens", pa.int32()),
    ("ce_sum", pa.float32()), ("kl_sum", pa.float32()), ("distill_sum", pa.float32()), ("loss_sum", pa.float32()),
    ("top1_agree", pa.int32()), ("topk_mass_sum", pa.float32()), ("teacher_entropy_sum", pa.float32()),
    ("aligned_frac", pa.float32()), ("mapped_mass", pa.float32()),
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
        self.folder = Folder(log_dir)
        self.rank, self.flush_rows = rank, flush_rows
        self.buffers: dict[tuple[int, str], dict[str, list]] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loss-log")
        self.pending: list[Future] = []
        self.attempt = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.parts = 0  # parts written by this writer: the NNNNN of their names

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
                buf[name].extend(rows[name] if name in rows else [None] * n)
        if len(buf["sample_id"]) >= self.flush_rows:
            self._submit(round_, split)

    def _submit(self, round_: int, split: str) -> None:
        buf = self.buffers.pop((round_, split), None)
        if buf and buf["sample_id"]:
            table = pa.table(buf, schema=SCHEMA)
            self.pending.append(self.pool.submit(self._write, round_, split, table))

    def _write(self, round_: int, split: str, table: pa.Table) -> None:
        """Write one part file ``part-<attempt>-NNNNN.parquet``, a name no other part has or had
        (locally ``.NAME.tmp`` renamed over it; one PUT on a store).

        Raises:
            StorageError: an I/O error (the part is not written).
        """
        d = self.folder.sub(f"round={round_}/split={split}/rank={self.rank}")
        d.makedirs()
        name = f"part-{self.attempt}-{self.parts:05d}.parquet"
        self.parts += 1  # on the writer thread only (one worker): no race
        with writing("loss-log part", d.join(name), *d.local_paths(f".{name}.tmp")):
            d.write_bytes(name, _parquet_bytes(table), tmp_name=f".{name}.tmp")

    def truncate_after(self, round_: int, step: int, world_size: int = 1) -> int:
        """Drop the rows of ``round_`` logged after optimizer step ``step`` (on resume from the
        checkpoint of ``step``, or from nothing with ``step`` 0, so that no visit is logged
        twice), in the directories ``rank=K`` with ``K % world_size == self.rank``: together
        the ranks of the resumed run trim every rank's files, those of ranks the run no longer
        has included. Each part is replaced whole (locally ``.NAME.tmp`` renamed over it; one
        PUT on a store); a part left without rows is removed. Every rank must finish this
        before any rank writes rows of the resumed run (the caller's collective).

        Returns:
            The number of rows dropped.
        Raises:
            ValueError: a part is not readable parquet (named).
            StorageError: an I/O error rewriting a part (it stays as it was).
        """
        import pyarrow.compute as pc

        rounds = self.folder.sub(f"round={round_}")
        found = rounds.files() if rounds.exists() else {}
        dropped = 0
        for rel in sorted(found):
            parts = rel.split("/")
            if not (len(parts) == 3 and parts[0].startswith("split=") and parts[1].startswith("rank=")
                    and parts[1][5:].isdigit() and int(parts[1][5:]) % world_size == self.rank
                    and parts[2].startswith("part-") and parts[2].endswith(".parquet")):
                continue
            d, name = rounds.sub(f"{parts[0]}/{parts[1]}"), parts[2]
            try:
                table = pq.read_table(d.readable(name))
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(unreadable_part(d.join(name), e) + ", and resume again") from None
            if table.num_rows and pc.max(table["step"]).as_py() > step:
                kept = table.filter(pc.less_equal(table["step"], step))
                dropped += table.num_rows - kept.num_rows
                if kept.num_rows == 0:
                    d.remove(name)
                    continue
                with writing("loss-log part", d.join(name), *d.local_paths(f".{name}.tmp")):  # whole old or whole new
                    d.write_bytes(name, _parquet_bytes(kept), tmp_name=f".{name}.tmp")
        return dropped

    def flush(self) -> None:
        """Write every buffered row and wait until all part files are closed."""
        for key in list(self.buffers):
            self._submit(*key)
        for f in self.pending:
            f.result()
        self.pending.clear()

    def close(self) -> None:
        """:meth:`flush`, then stop the writer thread.

        Raises:
            StorageError: an I/O error writing a part file.
        """
        self.flush()
        self.pool.shutdown(wait=True)


def _parquet_bytes(table: pa.Table) -> bytes:
    """A whole zstd parquet file in memory (one PUT to a store)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()
