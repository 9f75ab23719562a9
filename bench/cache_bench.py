"""Cache storage and read speed: bytes/token, reconstruction KL, write MB/s, streaming and
random-access samples/s for both backends and each coding, against an uncompressed baseline
measured in the same run; and the data loader's rate against the demo student's consumption.

Teachers:

* ``real``: the stories260K Llama (V=512) of ``../shared/realdata`` over the first
  ``--samples`` paragraphs of ``tinystories/valid_a.txt`` (skipped when absent).
* ``synth32k``: a synthetic V=32,000 teacher over the same token lengths. Its logits are
  ``-1.1·log(1 + id)`` (a Zipf prior: BPE ids roughly follow frequency, like real vocabularies)
  ``+ 1.5·N(0, 1)`` per (position, id) ``+`` a boost ``U(3, 9)`` on 4 random ids per position
  (the context's plausible continuations). Its mean entropy and top-64 mass are printed so the
  reader can compare it with a real model; random top-k sets make its ids harder to code than
  a real model's.

Exact float32 top-128 targets are computed once per teacher; smaller k are their prefixes
(tail recomputed). Every (teacher, k, coding, backend) cache is written with the real
:class:`pipeline.cache.writer.CacheWriter` and read back with :func:`pipeline.cache.open_cache`.

* bytes/token: bytes of the closed shards on disk / tokens.
* recon KL: mean over valid positions of KL(exact top-k ‖ stored top-k), both renormalised
  over the k slots (:func:`pipeline.cache.codec.reconstruction_kl`), nats.
* write MB/s: float32-equivalent target megabytes (ids int32 + values float32 + tail) coded
  and written per second (the same numerator for every coding, so the column is comparable).
* stream samples/s: every record in storage order (``iter``), fresh reader.
* random samples/s: every sample once in random order with an LRU of 1 byte (each access
  decodes its block; a warm LRU makes this as fast as streaming).
* ratios: against ``baseline`` = float32 values, plain ids, no compression, same backend.

Loader vs consumption (``--loader``): the demo student (hidden 64, 2 layers, 4 heads, FFN 256,
``configs/demo``) trains on the real-teacher k=64 default-coding cache, micro-batch 16, α=0.5;
consumption = its training tokens/s (median of steps); stream rate = tokens/s that
:class:`pipeline.student.sampler.StepPrefetcher` with ``num_workers=0`` (one thread, inline) delivers as
collated batches from a cold reader. Goal: stream / consumption ≥ 20. Also the fraction of a
training step spent waiting for the prefetching loader (``num_workers=2``).

Run (about 3-5 minutes on 2 CPU cores)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/cache_bench.py [--real ../shared/realdata] [--samples 300]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import cache_bytes, finalize_cache, open_cache, open_writer, prepare_cache  # noqa: E402
from pipeline.cache.codec import Encoding, reconstruction_kl  # noqa: E402
from pipeline.cache.manifest import Manifest, TeacherEntry  # noqa: E402
from pipeline.cache.records import CacheRecord  # noqa: E402
from pipeline.numerics import log1mexp  # noqa: E402
from tests.reference_targets import topk_targets  # noqa: E402 — the dense reference (tests only)

KMAX = 128
CODINGS = [  # name, value_dtype, index_coding, compression, q8_step
    ("baseline", "float32", "plain", "none", 1 / 16),
    ("f32-zstd", "float32", "plain", "zstd", 1 / 16),
    ("f16-zstd", "float16", "plain", "zstd", 1 / 16),
    ("bf16-zstd", "bfloat16", "plain", "zstd", 1 / 16),
    ("f16-delta", "float16", "delta", "zstd", 1 / 16),
    ("q8-plain", "q8", "plain", "zstd", 1 / 16),
    ("q8-delta", "q8", "delta", "zstd", 1 / 16),
    ("q8/8-delta (default)", "q8", "delta", "zstd", 1 / 8),
]


def real_teacher(real: Path, n: int) -> tuple[list, int]:
    """(records with exact top-KMAX float32 targets, V) of the stories260K teacher."""
    from pipeline.config import DatasetConfig
    from pipeline.data import load_samples
    from pipeline.models import load_teacher, load_tokenizer

    tdir = real / "teacher-stories260K"
    tok = load_tokenizer(tdir)
    samples = load_samples(DatasetConfig(path=str(real / "tinystories/valid_a.txt"), sample_by="paragraph",
                                         num_samples=n, max_length=256), tok)[0]
    model = load_teacher(tdir)
    recs = []
    with torch.no_grad():
        for s in samples:
            ids = torch.from_numpy(s.input_ids.astype(np.int64))[None]
            lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            recs.append(_record(s, topk_targets(lp, ids, KMAX)))
    return recs, lp.shape[-1]


def synthetic_teacher(lengths: list[int], V: int = 32000, seed: int = 0) -> list:
    """Records of the synthetic V-token teacher (see the module docstring) over ``lengths``."""
    from pipeline.data import Sample

    g = torch.Generator().manual_seed(seed)
    prior = -1.1 * torch.log1p(torch.arange(V, dtype=torch.float32))
    recs = []
    for i, T in enumerate(lengths):
        ids = torch.randint(0, V, (1, T), generator=g)
        z = prior + 1.5 * torch.randn(T, V, generator=g)
        boost = torch.randint(0, V, (T, 4), generator=g)
        z.scatter_add_(1, boost, 3 + 6 * torch.rand(T, 4, generator=g))
        lp = torch.log_softmax(z, -1)[None]
        s = Sample(f"synth-{i}", ids[0].numpy().astype(np.int32), np.ones(T, dtype=bool))
        recs.append(_record(s, topk_targets(lp, ids, KMAX)))
    return recs


def _record(s, tg) -> CacheRecord:
    n = len(s.input_ids) - 1
    target = tg.target_logprob[0, :n].numpy()
    return CacheRecord(s.sample_id, s.input_ids, s.loss_mask, tg.topk_ids[0, :n].numpy(), tg.topk_logprobs[0, :n].numpy(),
                       tg.tail_logprob[0, :n].numpy(), float(-target[s.loss_mask[1:]].astype(np.float64).sum()))


def prefix(recs: list, k: int) -> list:
    """The top-k of top-KMAX records (tail log-mass recomputed)."""
    out = []
    for r in recs:
        v = r.topk_logprobs[:, :k]
        tail = log1mexp(torch.logsumexp(torch.from_numpy(v), -1)).numpy()
        out.append(CacheRecord(r.sample_id, r.input_ids, r.loss_mask, r.topk_ids[:, :k], v, tail, r.teacher_nll_sum))
    return out


def measure(recs: list, V: int, k: int, coding: tuple, backend: str, root: Path, speed: bool) -> dict:
    name, vd, ic, comp, step = coding
    d = root / f"{backend}-{name.split()[0]}-{k}"
    m = Manifest(backend=backend, k=k, index_dtype=Encoding.index_dtype_for(V), value_dtype=vd, index_coding=ic,
                 q8_step=step, compression=comp, vocab_size=V, temperature=1.0, tokenizer_fingerprint="bench",
                 teachers=[TeacherEntry(path="bench", weight=1.0, fingerprint="bench")], dataset={},
                 dataset_fingerprint="bench", max_length=256)
    state = prepare_cache(d, m, overwrite=True)
    n_tok = sum(len(r.input_ids) for r in recs)
    raw_mb = sum(r.topk_ids.size * 4 + r.topk_logprobs.size * 4 + r.tail_logprob.size * 4 for r in recs) / 1e6
    t0 = time.perf_counter()
    w = open_writer(d, m, 0, state.attempt, samples_per_shard=1024, row_group_size=32)
    w.write(recs)
    w.close()
    write_s = time.perf_counter() - t0
    finalize_cache(d)
    out = {"bytes_per_token": cache_bytes(d) / n_tok, "write_mb_s": raw_mb / write_s}
    r = open_cache(d, verify=False)
    t0 = time.perf_counter()
    got = {rec.sample_id: rec for rec in r}
    out["stream_sps"] = len(recs) / (time.perf_counter() - t0)
    kls = []
    for rec in recs:
        g = got[rec.sample_id]
        valid = rec.loss_mask[1:]
        # align stored slots to the exact ones by id (coding may reorder ties)
        order = np.argsort(g.topk_ids, axis=1, kind="stable")
        pos = np.take_along_axis(order, np.argsort(np.argsort(rec.topk_ids, axis=1), axis=1), axis=1)
        stored = np.take_along_axis(g.topk_logprobs, pos, axis=1)
        kls.append(reconstruction_kl(rec.topk_logprobs[valid], stored[valid]))
    out["recon_kl"] = float(np.concatenate(kls).mean())
    if speed:
        cold = open_cache(d, verify=False, max_cached_bytes=1)
        order = np.random.default_rng(0).permutation(len(recs))
        t0 = time.perf_counter()
        for i in order:
            cold[int(i)]
        out["random_sps"] = len(recs) / (time.perf_counter() - t0)
    return out


def loader_vs_consumption(recs: list, V: int, root: Path, demo_cache: Path | None = None,
                          demo_student: Path | None = None) -> dict:
    """Training tokens/s of the demo student vs the loader's delivery rate, both on one thread.

    With ``demo_cache`` and ``demo_student`` (the demo's own cache and student config, V=4096,
    k=32) they are used as they are; otherwise the demo student architecture is built at the
    records' vocabulary and trained on a k=64 default-coding cache of ``recs``. One thread each
    (``torch.set_num_threads(1)``), so the ratio is per core and does not depend on how busy the
    other core is; padded tokens in both rates (what the student's forward processes).
    """
    from pipeline.data.demo_corpus import llama_config
    from pipeline.config import LossConfig
    from pipeline.distributed import init_distributed, shard_model
    from pipeline.models import defer_output_projection
    from pipeline.student.sampler import StepPrefetcher, StepSampler
    from pipeline.student.step import Trainer
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(1)
    if demo_cache is not None and demo_student is not None:
        d, student_cfg = demo_cache, AutoConfig.from_pretrained(demo_student)
    else:
        d = root / "loader"
        m = Manifest(backend="parquet", k=64, index_dtype=Encoding.index_dtype_for(V), value_dtype="q8",
                     index_coding="delta", vocab_size=V, temperature=1.0, tokenizer_fingerprint="b",
                     teachers=[TeacherEntry(path="b", weight=1, fingerprint="b")], dataset={}, dataset_fingerprint="b",
                     max_length=256)
        st = prepare_cache(d, m, overwrite=True)
        w = open_writer(d, m, 0, st.attempt, 1024, 32)
        w.write(prefix(recs, 64))
        w.close()
        finalize_cache(d)
        student_cfg = llama_config(V, 64, 2, 4, 2, 256)
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(student_cfg)
    defer_output_projection(model)  # as train-student: the output layer runs in the fused loss
    shard_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer = Trainer(model, opt, sched, LossConfig(alpha=0.5), 1.0, info.device)
    n_samples = len(open_cache(d, verify=False))

    def sampler():
        return StepSampler(np.arange(n_samples), 16, 1, 0, 1, seed=0)

    # stream rate: inline (the calling thread), cold reader, one epoch of steps
    r = open_cache(d)
    s = sampler()
    loader = StepPrefetcher(s, r, num_workers=0)
    t0, n_tok = time.perf_counter(), 0
    for _ in range(s.steps_per_epoch):
        n_tok += sum(int(b.input_ids.numel()) for b in loader.next_step())
    stream = n_tok / (time.perf_counter() - t0)
    # consumption: training fed by the prefetching loader; time waiting for it measured
    r = open_cache(d)
    loader = StepPrefetcher(sampler(), r, num_workers=2, depth=4)
    times, waits, toks = [], [], []
    for i in range(40):
        t0 = time.perf_counter()
        micro = loader.next_step()
        t1 = time.perf_counter()
        trainer.train_step(micro)
        t2 = time.perf_counter()
        if i >= 5:
            times.append(t2 - t1)
            waits.append(t1 - t0)
            toks.append(sum(int(b.input_ids.numel()) for b in micro))
    loader.close()
    consume = sum(toks) / sum(times)
    return {"stream_tok_s": stream, "train_tok_s": consume, "ratio": stream / consume, "cache": str(d),
            "k": r.manifest.k, "V": r.manifest.vocab_size, "coding": f"{r.manifest.value_dtype}/{r.manifest.index_coding}",
            "wait_fraction": sum(waits) / (sum(waits) + sum(times))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", default=str(Path(__file__).resolve().parents[2] / "shared" / "realdata"))
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--ks", default="8,32,64,128")
    ap.add_argument("--no-loader", action="store_true", help="skip the loader-vs-consumption measurement")
    ap.add_argument("--loader-only", action="store_true", help="only the loader-vs-consumption measurement")
    ap.add_argument("--demo-cache", default="runs/demo/cache-train", help="the demo's cache (used when present)")
    ap.add_argument("--demo-student", default="data/build/student-init", help="the demo student's config dir")
    args = ap.parse_args()
    ks = [int(x) for x in args.ks.split(",")]
    teachers = {}
    real = Path(args.real)
    if (real / "teacher-stories260K").is_dir():
        t0 = time.perf_counter()
        teachers["real"] = real_teacher(real, args.samples)
        print(f"real teacher: {len(teachers['real'][0])} samples in {time.perf_counter() - t0:.1f}s")
    else:
        print(f"no real teacher at {real}: synthetic only")
    demo = _demo_paths(args)
    if args.loader_only:
        with tempfile.TemporaryDirectory() as tmp:
            recs, V = (None, 0) if demo else teachers.get("real", (synthetic_teacher([200] * args.samples), 32000))
            print(_loader_line(loader_vs_consumption(recs, V, Path(tmp), *demo)))
        return 0
    lengths = [len(r.input_ids) for r in teachers["real"][0]] if "real" in teachers else [200] * args.samples
    t0 = time.perf_counter()
    teachers["synth32k"] = (synthetic_teacher(lengths), 32000)
    print(f"synthetic teacher in {time.perf_counter() - t0:.1f}s")
    for name, (recs, V) in teachers.items():
        lp = np.concatenate([r.topk_logprobs[r.loss_mask[1:]] for r in recs])
        mass64 = np.exp(lp[:, :64].astype(np.float64)).sum(1)
        print(f"{name}: V={V}, {sum(len(r.input_ids) for r in recs)} tokens, top-64 mass mean {mass64.mean():.4f}, "
              f"top-{KMAX} entropy (lower bound) mean {-(np.exp(lp) * lp).sum(1).mean():.3f} nats")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("\n## bytes/token (parquet; recon KL in nats in brackets)")
        print("| teacher | coding | " + " | ".join(f"k={k}" for k in ks) + " |")
        print("|---|---|" + "---|" * len(ks))
        for name, (recs, V) in teachers.items():
            for coding in CODINGS:
                cells = []
                for k in ks:
                    res = measure(prefix(recs, k), V, k, coding, "parquet", root, speed=False)
                    cells.append(f"{res['bytes_per_token']:.1f} [{res['recon_kl']:.1e}]")
                print(f"| {name} | {coding[0]} | " + " | ".join(cells) + " |", flush=True)
        print("\n## speed at k=64 (ratios against the same backend's uncompressed baseline)")
        print("| teacher | backend | coding | bytes/token | write MB/s | stream samples/s | random samples/s | "
              "bytes ratio | stream ratio | random ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, (recs, V) in teachers.items():
            r64 = prefix(recs, 64)
            for backend in ("parquet", "zarr"):
                base = None
                for coding in CODINGS:
                    res = measure(r64, V, 64, coding, backend, root, speed=True)
                    base = base or res
                    print(f"| {name} | {backend} | {coding[0]} | {res['bytes_per_token']:.1f} | {res['write_mb_s']:.0f} | "
                          f"{res['stream_sps']:.0f} | {res['random_sps']:.0f} | "
                          f"{res['bytes_per_token'] / base['bytes_per_token']:.3f} | "
                          f"{res['stream_sps'] / base['stream_sps']:.2f} | {res['random_sps'] / base['random_sps']:.2f} |",
                          flush=True)
        if not args.no_loader:
            recs, V = teachers.get("real", teachers["synth32k"])
            print("\n" + _loader_line(loader_vs_consumption(recs, V, root, *demo)))
    return 0


def _demo_paths(args) -> tuple:
    """(demo cache, demo student config) when both exist and the cache is readable, else ()."""
    try:
        open_cache(args.demo_cache, verify=False)
    except (FileNotFoundError, ValueError):
        return ()
    return (Path(args.demo_cache), Path(args.demo_student)) if Path(args.demo_student, "config.json").is_file() else ()


def _loader_line(res: dict) -> str:
    return (f"## loader vs demo-student consumption ({res['cache']}: k={res['k']}, V={res['V']}, {res['coding']})\n"
            f"stream {res['stream_tok_s']:.0f} tok/s (1 thread, cold reader) / training {res['train_tok_s']:.0f} tok/s "
            f"(1 thread) = {res['ratio']:.1f}x (goal >= 20); trainer waited {100 * res['wait_fraction']:.2f}% of its "
            f"time for the prefetching loader (2 threads, 4 steps ahead)")


if __name__ == "__main__":
    sys.exit(main())
