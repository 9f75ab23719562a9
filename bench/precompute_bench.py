"""Stage 1 throughput against a bare teacher forward, and per-rank memory of a sharded teacher.

What it measures, in one run on one machine:

* **Throughput ratio.** ``precompute`` (pipeline/precompute.py: FSDP2-sharded teacher(s),
  full-vocabulary log-softmax, ensemble mixture, top-k + tail, device→host copy, cache write)
  in tokens/s of its teacher loop, against a **bare forward**: the same teacher module(s),
  sharded the same way, called as ``model(input_ids).logits`` over exactly the same
  length-sorted batches (same per-rank split, same padding calls), nothing else. Goal:
  ``precompute / bare ≥ 0.95``. The bare loop runs before and after precompute; the mean of
  the two is the baseline (damps drift on a shared machine). Both are global tokens/s: all
  ranks' real tokens / the slowest rank's loop seconds.
* **Memory per rank.** Parameter bytes resident per rank after ``fully_shard`` (the local
  shards, ``DTensor.to_local()``) against the unsharded parameter bytes (goal ≈ 1/world), the
  RSS growth from before loading to after sharding (``/proc/self/statm``), and the process's
  peak RSS (``ru_maxrss``; it includes the transient full load: every rank loads the whole
  checkpoint before sharding it).

For 1 teacher and a 2-teacher ensemble (probability mixture, weights 0.5/0.5), on 1 rank and on
2 ranks (``torchrun --standalone --nproc_per_node=2``, gloo, 1 thread each; the 1-rank run uses
``OMP_NUM_THREADS`` threads, default 2). Teachers: random Llamas of about 20M parameters
(``data.stdlib_corpus.llama_config``: hidden 512, 5 layers, FFN 1376, V = an 8192-token
byte-level BPE trained on the standard-library corpus), built from a config into a temporary
directory; and, with ``--real DIR`` (e.g. ../shared/realdata), the real stories260K teacher on
TinyStories paragraphs (its "ensemble" is the teacher twice).

Run (from the repository root; about 3-5 minutes on 2 shared CPU cores)::

    .venv/bin/python bench/precompute_bench.py [--real ../shared/realdata] [--samples 96] [--json out.json]

Read the ratios, not the absolute numbers: the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_assets(d: Path, samples: int) -> dict:
    """The synthetic 20M-parameter teachers (seeds 0 and 1), their tokenizer and a corpus."""
    import torch
    from transformers import AutoModelForCausalLM

    from data.stdlib_corpus import build_corpus, llama_config, train_tokenizer

    dd = build_corpus(d / "corpus", max_chars=1500, heldout_fraction=0.05, limit_files=150)
    tok = train_tokenizer(dd["train"]["text"][:], 8192, d / "tokenizer")
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(llama_config(len(tok), 512, 5, 8, 8, 1376,
                                                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
        model.save_pretrained(d / f"teacher{seed}")
        tok.save_pretrained(d / f"teacher{seed}")
        teachers.append(str(d / f"teacher{seed}"))
    return {"name": f"random Llama {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, V={len(tok)}",
            "teachers": teachers, "dataset": {"path": str(d / "corpus"), "split": "train", "id_field": "id",
                                              "max_length": 256, "num_samples": samples}}


def real_assets(real: Path, samples: int) -> dict:
    t = str(real / "teacher-stories260K")
    return {"name": "stories260K (real), V=512", "teachers": [t, t],
            "dataset": {"path": str(real / "tinystories" / "train_head.txt"), "sample_by": "paragraph",
                        "max_length": 256, "num_samples": samples * 4}}


# ----------------------------------------------------------------------------- child (one rank)
def _bare_forward(teachers, batches, samples, info) -> tuple[int, float]:
    """This rank's (real tokens, seconds) of plain forwards over its share of ``batches``."""
    import torch

    from pipeline.loader import collate

    mine = batches[info.rank::info.world_size]
    n_calls = -(-len(batches) // info.world_size)
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for b in range(n_calls):
            group = mine[b] if b < len(mine) else None
            ids = collate(group if group else [samples[0]], pad_only=group is None).input_ids.to(info.device)
            for t in teachers:
                t(input_ids=ids, use_cache=False).logits
            tokens += sum(len(s.input_ids) for s in group or ())
    return tokens, time.perf_counter() - t0


def child(spec: dict, work: Path) -> None:
    """Run every measurement of ``spec`` on this rank; rank 0 appends JSON results to spec['out']."""
    import gc

    import torch

    from pipeline.config import PrecomputeConfig
    from pipeline.data import load_samples
    from pipeline.distributed import gather_objects, init_distributed, shard_model, teardown
    from pipeline.models import load_tokenizer
    from pipeline.precompute import LAST_STATS, _batches, _load_teachers, precompute

    info = init_distributed("cpu")
    results = []
    try:
        for n_teachers in (1, 2):
            teachers_cfg = [{"path": p, "weight": 1.0} for p in spec["teachers"][:n_teachers]]
            cfg = PrecomputeConfig.model_validate({
                "teachers": teachers_cfg, "dataset": spec["dataset"], "batch_size": spec["batch_size"], "device": "cpu",
                "cache": {"dir": str(work / f"cache-w{info.world_size}-m{n_teachers}"), "k": 32, "overwrite": True}})
            tokenizer = load_tokenizer(spec["teachers"][0])
            gc.collect()
            rss0 = _rss_bytes()
            teachers, V, _ = _load_teachers(cfg, tokenizer, torch.float32)
            rss_loaded = _rss_bytes()
            full_bytes = sum(p.numel() * p.element_size() for t in teachers for p in t.parameters())
            for t in teachers:
                shard_model(t, sum_gradients=False)
            gc.collect()
            rss_sharded = _rss_bytes()
            local_bytes = sum(p.to_local().numel() * p.element_size() for t in teachers for p in t.parameters())
            samples, _, _ = load_samples(cfg.dataset, tokenizer)
            batches = _batches(samples, cfg.batch_size)
            _bare_forward(teachers, batches[: info.world_size], samples, info)  # warm-up
            bare1 = gather_objects(_bare_forward(teachers, batches, samples, info))
            precompute(cfg, info)
            pre = dict(LAST_STATS)
            bare2 = gather_objects(_bare_forward(teachers, batches, samples, info))
            bare = [sum(t for t, _ in b) / max(s for _, s in b) for b in (bare1, bare2)]
            mem = gather_objects({"rss_growth": rss_sharded - rss0, "rss_full_load": rss_loaded - rss0,
                                  "local_param_bytes": local_bytes,
                                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
            results.append({"assets": spec["name"], "world_size": info.world_size, "teachers": n_teachers,
                            "tokens": pre["tokens"], "precompute_tok_s": pre["tokens_per_s"],
                            "bare_tok_s": sum(bare) / 2, "bare_runs": bare,
                            "ratio": pre["tokens_per_s"] / (sum(bare) / 2),
                            "full_param_bytes": full_bytes, "per_rank": mem})
            del teachers
        if info.is_main:
            with open(spec["out"], "a") as f:
                for r in results:
                    f.write(json.dumps(r) + "\n")
    finally:
        teardown()


# ----------------------------------------------------------------------------- parent
def _launch(spec_path: Path, nproc: int, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}
    me = [str(Path(__file__).resolve()), "--child", str(spec_path)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *me]
           if nproc > 1 else [sys.executable, *me])
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"child failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")


def _table(rows: list[dict]) -> str:
    mib = 1 << 20
    out = ["| teacher(s) | ranks | teachers | precompute tok/s | bare forward tok/s | ratio | params/rank MiB "
           "(of full) | RSS growth/rank MiB | peak RSS/rank MiB |", "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        local = max(m["local_param_bytes"] for m in r["per_rank"])
        out.append(f"| {r['assets']} | {r['world_size']} | {r['teachers']} | {r['precompute_tok_s']:,.0f} | "
                   f"{r['bare_tok_s']:,.0f} | **{r['ratio']:.3f}** | {local / mib:.1f} of {r['full_param_bytes'] / mib:.1f} "
                   f"({local / r['full_param_bytes']:.2f}) | {max(m['rss_growth'] for m in r['per_rank']) / mib:.0f} | "
                   f"{max(m['peak_rss'] for m in r['per_rank']) / mib:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--real", help="realdata directory with teacher-stories260K/ and tinystories/")
    ap.add_argument("--samples", type=int, default=96, help="samples of the synthetic corpus (x4 for the real text)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        child(spec, Path(spec["work"]))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    with tempfile.TemporaryDirectory(prefix="precompute-bench-") as tmp:
        d = Path(tmp)
        all_assets = [build_assets(d / "synthetic", args.samples)]
        if args.real and (Path(args.real) / "teacher-stories260K").is_dir():
            all_assets.append(real_assets(Path(args.real), args.samples))
        out = d / "results.jsonl"
        for i, a in enumerate(all_assets):
            spec = {**a, "batch_size": args.batch_size, "out": str(out), "work": str(d / f"work{i}")}
            p = d / f"spec{i}.json"
            p.write_text(json.dumps(spec))
            for nproc in (1, 2):
                _launch(p, nproc, threads if nproc == 1 else 1)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
