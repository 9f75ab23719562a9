"""Stage two's step against a plain PyTorch training loop, measured in one run.

What it measures, on the same student (a tied Llama from ``pipeline.data.demo_corpus.llama_config``)
and the same batches:

* ``plain``: the loop a user would write without this project: ``model(input_ids).logits`` →
  ``F.cross_entropy`` over every position (the full ``(B, T, V)`` logits) → ``backward`` →
  ``AdamW.step`` → ``zero_grad``; no FSDP, no clipping, data already in memory. **The baseline.**
* ``ce``: train-student with ``loss.alpha: 1`` — ``pipeline.student.step.Trainer.train_step`` on the
  student as train-student runs it at one rank in float32 (the plain module, no FSDP2; see
  ``fsdp_at_world_size_1``) with the fused output loss, clipping at 1.0, AdamW, batches read
  from a parquet cache by the prefetching loader (``StepPrefetcher``, train-student's default
  threads).
* ``kd``: the same with ``alpha: 0.5``, ``tail: bucket`` and the cache's k = 64 top-k targets.
* ``kd-fsdp`` (``fixed`` and ``small``): ``kd`` with the student wrapped in FSDP2 at one rank
  (``fsdp_at_world_size_1: true``): what the plain module saves.
* variable-length data (TinyStories paragraphs tokenized with the stories260K tokenizer when
  ``--realdata`` is given, otherwise lengths drawn like them): ``plain-var`` (the plain loop,
  right-padded to the longest sample, ``ignore_index`` on the padding), ``padded`` (train-student
  KD, packing off) and ``packed`` (``data.packing: true``, rows of ``--max-length``). Tokens/s
  counts valid target tokens; the first step's per-sample ``ce_sum``/``kl_sum`` and global token
  count of ``packed`` are compared with ``padded``'s.
* ``div``: ``kd`` with each ``loss.divergence`` (pipeline/student/divergences.py) on the
  V = 512 and the V = 32,000 student, as a ratio to ``forward_kl`` in the same run.
* ``--memory``: peak RSS of one step at B = 1, T = 4,096 (``plain`` vs ``kd``).

Every mode runs in a fresh child process (this script with ``--child``), so its peak RSS is its
own and modes do not share warm caches; ``--rounds`` repeats the set in alternating order and
reports medians. Step time: median over ``--steps`` steps after ``--warmup`` steps. Torch threads
come from ``OMP_NUM_THREADS`` (default 2). Read the ratios: the machines are shared and noisy.

Run (from the repository root; about 10 minutes on 2 CPU cores with the defaults)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/student_step.py [--realdata ../shared/realdata] [--memory]

Goals: kd ≥ 1.0× plain and ce ≥ 1.05× plain at V = 32,000
(8 × 512, hidden 256, 4 layers); kd ≥ 0.95× plain on the hidden-32, V = 512 student; packed ≥
1.5× padded valid tokens/s; one kd step's peak RSS at B = 1, T = 4,096 ≤ 0.6× plain's; every
divergence ≥ 0.85× forward_kl.

On a GPU (``--device cuda``) every mode runs on the device with train-student's compute dtype
there (``--mixed-precision auto``: bf16): ``plain`` under ``torch.autocast(bfloat16)`` with
float32 weights (the loop a user would write), ``ce`` / ``kd`` as train-student (FSDP2 at one
rank with a bf16 ``MixedPrecisionPolicy``, the loader's batches pinned), so ``kd-fsdp`` is the
same as ``kd`` and is left out. Step times end at a synchronisation (the trainer's own host
transfer; ``torch.cuda.synchronize()`` in ``plain``), and each child reports the peak device
memory of its first step (``step_device_mib``). The ``fixed`` section's student is sized by
``--vocabs`` (one sub-section per V) and ``--hidden``/``--layers``/``--heads``/``--kv-heads``/
``--ffn`` (defaults: the ``v32k`` student); ``--json`` writes its results; ``--in-process``
runs the modes in this process (a smoke test). The defaults are the CPU run above.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
K = 64
STUDENTS = {"v32k": dict(vocab=32000, hidden=256, layers=4, heads=4, kv_heads=2, ffn=512),
            "v512": dict(vocab=512, hidden=32, layers=4, heads=4, kv_heads=2, ffn=86),
            # a student whose transformer body, not its output layer, dominates the step (25M body
            # parameters, the stories260K vocabulary): where padding costs the most compute
            "body": dict(vocab=512, hidden=512, layers=8, heads=8, kv_heads=4, ffn=1376)}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tinystories_lengths(realdata: Path | None, n: int, max_length: int, seed: int) -> tuple[list[list[int]], str]:
    """Token ids of ``n`` TinyStories paragraphs (stories260K tokenizer, truncated to
    ``max_length``), or, without ``realdata``, random ids with lengths uniform in [10, 300]."""
    rng = np.random.default_rng(seed)
    if realdata is not None and (realdata / "tinystories" / "valid_a.txt").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(realdata / "teacher-stories260K"))
        paras = [p.strip() for p in (realdata / "tinystories" / "valid_a.txt").read_text().split("\n\n") if p.strip()]
        paras = [paras[i] for i in rng.permutation(len(paras))[:n]]
        return [tok(p)["input_ids"][:max_length] for p in paras], "TinyStories valid_a paragraphs"
    return [list(rng.integers(3, 512, int(rng.integers(10, 301)))) for _ in range(n)], "synthetic lengths U[10, 300]"


def write_cache(root: Path, token_lists: list[list[int]], V: int, seed: int = 0) -> Path:
    """A complete parquet cache (default coding) of the given samples with valid random top-k
    targets (distinct ids, sorted log-probabilities, total mass in [0.5, 0.95], the tail mass)."""
    from pipeline.cache import finalize_cache, open_writer, prepare_cache
    from pipeline.cache.codec import Encoding
    from pipeline.cache.manifest import Manifest, TeacherEntry
    from pipeline.cache.records import CacheRecord

    rng = np.random.default_rng(seed)
    k = min(K, V)
    recs = []
    for i, ids in enumerate(token_lists):
        P = len(ids) - 1
        gaps = rng.integers(1, max(2, V // k), (P, k))
        top = (rng.integers(0, V, (P, 1)) + np.cumsum(gaps, -1) - gaps[:, :1]) % V
        p = np.sort(rng.random((P, k)), -1)[:, ::-1] + 1e-3
        mass = 0.5 + 0.45 * rng.random((P, 1))
        vals = np.log(p / p.sum(-1, keepdims=True) * mass).astype(np.float32)
        tail = np.log1p(-np.exp(vals.astype(np.float64)).sum(-1)).astype(np.float32)
        recs.append(CacheRecord(f"b{i}", np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool),
                                top.astype(np.int32), vals, tail, 0.0))
    m = Manifest(backend="parquet", k=k, index_dtype=Encoding.index_dtype_for(V), value_dtype="q8",
                 index_coding="delta", vocab_size=V, temperature=1.0, tokenizer_fingerprint="bench",
                 teachers=[TeacherEntry(path="bench", weight=1.0, fingerprint="bench")], dataset={},
                 dataset_fingerprint="bench", max_length=max(len(t) for t in token_lists))
    state = prepare_cache(root, m, overwrite=True)
    w = open_writer(root, m, 0, state.attempt, samples_per_shard=4096, row_group_size=32)
    w.write(recs)
    w.close()
    finalize_cache(root)
    return root


def _peak_device_mib(device) -> float | None:
    """Peak device memory allocated since the last reset, MiB (CUDA), else None."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def child(spec: dict) -> dict:
    """One mode in this (fresh) process: set-up, ``warmup`` + ``steps`` optimizer steps."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from pipeline.data.demo_corpus import llama_config
    from pipeline.cache import open_cache
    from pipeline.distributed import compute_dtype
    from pipeline.student.sampler import StepSampler

    from pipeline.data.batch import collate
    st = spec.get("shape") or STUDENTS[spec["student"]]
    cfg = llama_config(st["vocab"], st["hidden"], st["layers"], st["heads"], st["kv_heads"], st["ffn"],
                       context=spec["context"])
    device = torch.device(spec.get("device", "cpu"))
    dtype = compute_dtype(spec.get("mixed_precision", "auto"), device)  # train-student's rule: bf16 on CUDA
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device)
    model.config.use_cache = False
    src = open_cache(spec["cache"])
    mb, n_steps = spec["micro_batch"], spec["warmup"] + spec["steps"]
    sampler = StepSampler(np.arange(len(src)), mb, 1, 0, 1, seed=0)
    times, tokens, first_rows = [], [], None
    setup_rss = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if spec["mode"].startswith("plain"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batches = []
        for _ in range(n_steps):  # data prepared up front (on the device): the baseline pays no loading
            b = collate([src[int(i)] for i in sampler.next_step()[0]])
            labels = torch.full(b.input_ids.shape, -100, dtype=torch.int64)
            labels.view(-1)[b.rows + 1] = b.labels  # position t's target sits at t+1
            batches.append((b.input_ids.to(device), labels.to(device), b.n_valid))
        V = st["vocab"]
        # the user's mixed precision: autocast over float32 weights (nothing on float32 runs)
        amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
        for x, labels, n in batches:
            t0 = time.perf_counter()
            with amp():
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            tokens.append(n)
            if len(times) == 1:
                step_rss, step_dev = peak_rss_mib(), _peak_device_mib(device)
    else:
        from pipeline.config import LossConfig, OptimConfig
        from pipeline.distributed import init_distributed, shard_model
        from pipeline.student.sampler import StepPrefetcher
        from pipeline.models import defer_output_projection
        from pipeline.student.step import Trainer, build_optimizer, lr_lambda

        info = init_distributed(device.type)
        defer_output_projection(model)
        if spec["mode"].endswith("-fsdp") or dtype is not None:  # as train-student (loop.uses_fsdp)
            shard_model(model, mixed_precision=dtype)
        ocfg = OptimConfig(lr=1e-3, warmup_steps=0, max_grad_norm=1.0)
        opt = build_optimizer(model, ocfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ocfg, n_steps))
        alpha = 1.0 if spec["mode"] == "ce" else 0.5  # kd, kd-fsdp, div, padded, packed: 0.5
        loss_cfg = LossConfig(alpha=alpha, tail="bucket", divergence=spec.get("divergence", "forward_kl"))
        trainer = Trainer(model, opt, sched, loss_cfg, 1.0, info.device,
                          packing=spec["mode"] == "packed")
        from pipeline.config import TrainDataConfig

        defaults = TrainDataConfig.model_fields  # train-student's defaults (num_workers, prefetch_steps)
        loader = StepPrefetcher(sampler, src, defaults["num_workers"].default, defaults["prefetch_steps"].default,
                                pack_length=spec["max_length"] if spec["mode"] == "packed" else None,
                                pin_memory=device.type == "cuda")  # as train-student's loader
        for _ in range(n_steps):
            t0 = time.perf_counter()
            micro = loader.next_step()
            stats = trainer.train_step(micro)  # ends with a host transfer: the device's work is done
            times.append(time.perf_counter() - t0)
            tokens.append(stats.n_tokens)
            if len(times) == 1:
                step_rss, step_dev = peak_rss_mib(), _peak_device_mib(device)
                first_rows = {c: stats.rows[c] for c in ("sample_id", "ce_sum", "kl_sum")} | {"n_tokens": stats.n_tokens}
        loader.close()
    w = spec["warmup"]
    return {"tok_s": sum(tokens[w:]) / sum(times[w:]), "step_s": statistics.median(times[w:]),
            "setup_rss_mib": setup_rss, "step_rss_mib": step_rss, "step_device_mib": step_dev,
            "first_rows": first_rows}


IN_PROCESS = False  # --in-process: modes run in this process (smoke tests), not in fresh children


def run_child(spec: dict) -> dict:
    if IN_PROCESS:
        from pipeline.distributed import teardown

        try:
            return child(spec)
        finally:
            teardown()  # the mode's one-rank process group
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    if res.returncode != 0:
        raise RuntimeError(f"mode {spec['mode']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def median_runs(specs: list[dict], rounds: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s["name"]: [] for s in specs}
    for r in range(rounds):
        for s in (specs if r % 2 == 0 else specs[::-1]):
            res = run_child(s)
            out[s["name"]].append(res)
            dev = f", peak device memory {res['step_device_mib']:,.0f} MiB" if res.get("step_device_mib") else ""
            print(f"  [{s['name']}] {res['tok_s']:,.0f} tok/s, step {res['step_s']:.3f} s, "
                  f"peak RSS {res['step_rss_mib']:,.0f} MiB{dev}", flush=True)
    return out


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--realdata", type=Path, default=None, help="../shared/realdata (TinyStories paragraphs)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--var-batch", type=int, default=16, help="samples per micro-batch on variable-length data")
    ap.add_argument("--memory", action="store_true", help="also the B=1, T=4096 peak-RSS comparison")
    ap.add_argument("--only", nargs="*", default=None, help="sections: fixed small var div memory")
    ap.add_argument("--div-students", nargs="*", default=["v512", "v32k"], choices=["v512", "v32k"],
                    help="students of the div section")
    v32k = STUDENTS["v32k"]
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every mode runs")
    ap.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                    help="compute dtype, train-student's rule (auto: bf16 on cuda, float32 on cpu)")
    ap.add_argument("--vocabs", type=int, nargs="+", default=[v32k["vocab"]],
                    help="vocabularies of the fixed section's student (one sub-section each)")
    for key in ("hidden", "layers", "heads", "kv_heads", "ffn"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=v32k[key], help=f"fixed student: {key}")
    ap.add_argument("--json", type=Path, default=None, help="also write the fixed/small results here (a JSON list)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the modes in this process (smoke tests; peak RSS is then shared)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    global IN_PROCESS
    IN_PROCESS = args.in_process
    sections = args.only or ["fixed", "small", "var", "div"] + (["memory"] if args.memory else [])
    print(f"student step benchmark; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"{args.rounds} round(s), median of {args.steps} steps after {args.warmup}; device {args.device}")
    import torch

    from pipeline.distributed import compute_dtype

    # on a GPU train-student's kd already is FSDP2 at one rank (bf16 policy): kd-fsdp would repeat it
    fsdp_anyway = compute_dtype(args.mixed_precision, torch.device(args.device)) is not None
    n_fixed = args.batch * (args.warmup + args.steps)
    rng = np.random.default_rng(0)
    lines, results = [], []
    with tempfile.TemporaryDirectory(prefix="kd-student-bench-") as tmp:
        tmp = Path(tmp)
        base = dict(warmup=args.warmup, steps=args.steps, micro_batch=args.batch, max_length=args.max_length,
                    device=args.device, mixed_precision=args.mixed_precision)
        shape = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "ffn")}
        fixed = [(f"fixed-V{V}" if len(args.vocabs) > 1 else "fixed", dict(shape, vocab=V)) for V in args.vocabs]
        for name, student in fixed + [("small", STUDENTS["v512"])]:
            if name.split("-")[0] not in sections:
                continue
            V = student["vocab"]
            cache = write_cache(tmp / f"cache-{name}", [list(rng.integers(0, V, args.seq)) for _ in range(n_fixed)], V)
            modes = ("plain", "ce", "kd", "kd-fsdp") if name != "small" else ("plain", "kd", "kd-fsdp")
            specs = [dict(base, name=f"{name}:{m}", mode=m, shape=student, cache=str(cache),
                          context=args.seq) for m in modes if not (m == "kd-fsdp" and fsdp_anyway)]
            print(f"[{name}] student {student}, {args.batch} x {args.seq} tokens, k={K} cache")
            res = median_runs(specs, args.rounds)
            plain = med(res[f"{name}:plain"], "tok_s")
            mem = "step_device_mib" if args.device == "cuda" else "step_rss_mib"
            for s in specs:
                r = med(res[s["name"]], "tok_s")
                per_round = ", ".join(f"{x['tok_s'] / y['tok_s']:.2f}" for x, y in zip(res[s["name"]], res[f"{name}:plain"]))
                lines.append(f"{s['name']:<20} {r:>10,.0f} tok/s   {r / plain:5.2f}x plain   (per round: {per_round})")
                results.append({"section": name, "mode": s["mode"], "device": args.device, "vocab": V, "tok_s": r,
                                "ratio_to_plain": r / plain, "step_s": med(res[s["name"]], "step_s"),
                                "memory": mem, "peak_mib": max(x[mem] for x in res[s["name"]]),
                                "per_round": [x["tok_s"] / y["tok_s"] for x, y in zip(res[s["name"]], res[f"{name}:plain"])]})
        if "var" in sections:
            n_var = args.var_batch * (args.warmup + args.steps)
            toks, what = tinystories_lengths(args.realdata, n_var, args.max_length, 1)
            for student in ("v512", "v32k", "body"):
                V = STUDENTS[student]["vocab"]
                cache = write_cache(tmp / f"cache-var-{student}", [[t % V for t in ids] for ids in toks], V)
                specs = [dict(base, name=f"var-{student}:{m}", mode=m, student=student, cache=str(cache),
                              context=args.max_length, micro_batch=args.var_batch) for m in ("plain-var", "padded", "packed")]
                print(f"[var] {what}: {sum(map(len, toks)) / len(toks):.0f} tokens/sample on average, "
                      f"micro-batch {args.var_batch} samples, student {student}")
                res = median_runs(specs, args.rounds)
                plain, padded = med(res[specs[0]["name"]], "tok_s"), med(res[specs[1]["name"]], "tok_s")
                for s in specs:
                    r = med(res[s["name"]], "tok_s")
                    lines.append(f"{s['name']:<22} {r:>10,.0f} valid tok/s   {r / plain:5.2f}x plain-var   "
                                 f"{r / padded:5.2f}x padded")
                a, b = res[specs[1]["name"]][0]["first_rows"], res[specs[2]["name"]][0]["first_rows"]
                rel = max(abs(x - y) / max(abs(y), 1e-30) for c in ("ce_sum", "kl_sum") for x, y in zip(b[c], a[c]))
                lines.append(f"  first step, packed vs padded: same sample ids {a['sample_id'] == b['sample_id']}, "
                             f"global valid tokens {b['n_tokens']} vs {a['n_tokens']}, max relative difference of "
                             f"per-sample ce_sum/kl_sum {rel:.2e}")
        if "div" in sections:
            from pipeline.student.divergences import DIVERGENCES

            for student in args.div_students:
                V = STUDENTS[student]["vocab"]
                cache = write_cache(tmp / f"cache-div-{student}",
                                    [list(rng.integers(0, V, args.seq)) for _ in range(n_fixed)], V)
                specs = [dict(base, name=f"div-{student}:{d}", mode="kd", divergence=d, student=student,
                              cache=str(cache), context=args.seq) for d in DIVERGENCES]
                print(f"[div] student {student}, {args.batch} x {args.seq} tokens, k={K} cache, alpha 0.5, bucket")
                res = median_runs(specs, args.rounds)
                fkl = med(res[specs[0]["name"]], "tok_s")
                for s in specs:
                    r = med(res[s["name"]], "tok_s")
                    lines.append(f"{s['name']:<28} {r:>10,.0f} tok/s   {r / fkl:5.2f}x forward_kl")
        if "memory" in sections:
            cache = write_cache(tmp / "cache-mem", [list(rng.integers(0, 32000, 4096)) for _ in range(3)], 32000)
            specs = [dict(base, name=f"mem:{m}", mode=m, student="v32k", cache=str(cache), context=4096, micro_batch=1,
                          warmup=0, steps=1) for m in ("plain", "kd")]
            print("[memory] one step, B=1, T=4096, V=32000")
            res = median_runs(specs, args.rounds)
            p, k = med(res["mem:plain"], "step_rss_mib"), med(res["mem:kd"], "step_rss_mib")
            lines.append(f"peak RSS of one step, B=1 T=4096 V=32000: plain {p:,.0f} MiB, kd {k:,.0f} MiB = {k / p:.2f}x "
                         f"(after set-up: {med(res['mem:plain'], 'setup_rss_mib'):,.0f} / {med(res['mem:kd'], 'setup_rss_mib'):,.0f} MiB)")
    print("\n".join(["", "results (medians over rounds)"] + lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
