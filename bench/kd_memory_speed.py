"""Peak memory and step time of one student training step: CE only vs KD from a cache vs online KD.

What it measures. One optimizer step (forward, ``pipeline.losses.distill_loss`` with the default
automatic ``chunk_size=0``, backward of ``loss_sum / n_valid``, AdamW step) of a small Llama
student (``data.stdlib_corpus.llama_config``: hidden 64, 2 layers, 4 heads, 2 KV heads, FFN 128)
on one sequence of ``--seq`` tokens (default 2048) over a ``--vocab``-token vocabulary (default
32000), in three modes:

* ``ce``: CE only (``alpha=1.0``): the baseline.
* ``kd``: ``alpha=0.5`` with sparse top-64 teacher targets as a cache would give them (random
  but valid: distinct int64 IDs, sorted log-probabilities of total mass < 1, the tail log-mass).
* ``online``: the same KD loss, but the targets come from a larger teacher Llama (hidden 256,
  4 layers, same vocabulary) held in memory and run under ``torch.no_grad`` every step
  (full logits → ``log_softmax`` → ``pipeline.teacher.topk_targets``).

Every mode runs in a fresh child process (this script with ``--child MODE``) so that its peak
RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own. The child reports the peak after
set-up (imports, models, batch), the peak after the first training step (the one-step peak
reported in the table) and the median step time of ``--steps`` steps after that first, warm-up,
step. Torch threads come from ``OMP_NUM_THREADS`` (default 2).

Goals: peak RSS of ``kd`` ≤ 1.10 × ``ce``; KD throughput ≥ 0.95 × CE (``t_ce / t_kd``); the
speed-up of KD from a cache over online KD is reported as ``t_online / t_kd``.

Run (from the repository root, about 1-2 minutes on 2 CPU cores)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/kd_memory_speed.py [--vocab 32000] [--seq 2048] [--steps 5]

Read the ratios, not the absolute numbers: machines are shared and noisy, and absolute MiB and
seconds depend on the allocator, the torch build and whatever else runs; the ratios compare
modes measured in the same run on the same machine. ``--rounds N`` runs every mode N times
(alternating order) and takes the median, to damp noise further.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("ce", "kd", "online")
K = 64
STUDENT = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128)
TEACHER = dict(hidden=256, layers=4, heads=4, kv_heads=2, ffn=512)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_targets(B: int, T: int, V: int, k: int, gen):
    """Valid sparse teacher targets for positions 0..T-2 without materialising (T, V) anything.

    IDs: a random start plus a cumulative sum of k gaps in [1, V//k - 1] (mod V), so the k IDs
    of a position are distinct; the sum of the gaps is < V. Log-probabilities: sorted
    descending, scaled to a random total mass in [0.5, 0.95] so the tail mass is > 0.
    """
    import torch

    from pipeline.teacher import log1mexp

    gaps = torch.randint(1, max(2, V // k), (B, T - 1, k), generator=gen)
    start = torch.randint(0, V, (B, T - 1, 1), generator=gen)
    topk_ids = ((start + gaps.cumsum(-1) - gaps[..., :1]) % V).to(torch.int64)  # first ID = start
    p = torch.rand(B, T - 1, k, generator=gen).sort(-1, descending=True).values + 1e-3
    mass = 0.5 + 0.45 * torch.rand(B, T - 1, 1, generator=gen)
    topk_logprobs = (p / p.sum(-1, keepdim=True) * mass).log().float()
    tail_logprob = log1mexp(torch.logsumexp(topk_logprobs, dim=-1)).float()
    return topk_ids, topk_logprobs, tail_logprob


def child(mode: str, vocab: int, seq: int, steps: int) -> dict:
    """Run one mode and return its measurements (called in a fresh process)."""
    import torch
    from transformers import AutoModelForCausalLM

    from data.stdlib_corpus import llama_config
    from pipeline.losses import distill_loss
    from pipeline.teacher import topk_targets

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    B, T, V = 1, seq, vocab

    def build(c):
        cfg = llama_config(V, c["hidden"], c["layers"], c["heads"], c["kv_heads"], c["ffn"], context=T)
        return AutoModelForCausalLM.from_config(cfg)

    student = build(STUDENT)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    input_ids = torch.randint(0, V, (B, T), generator=gen)
    valid = torch.ones(B, T - 1, dtype=torch.bool)
    n_valid = int(valid.sum())
    teacher = None
    targets = {}
    if mode == "kd":
        ids, lps, tail = random_targets(B, T, V, K, gen)
        targets = dict(topk_ids=ids, topk_logprobs=lps, tail_logprob=tail)
    elif mode == "online":
        teacher = build(TEACHER).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    alpha = 1.0 if mode == "ce" else 0.5

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        tg = targets
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(input_ids=input_ids).logits
                tt = topk_targets(torch.log_softmax(t_logits.float(), -1), input_ids, K)
                del t_logits
            # the cache loader hands int64 IDs to the loss (gather needs int64)
            tg = dict(topk_ids=tt.topk_ids.long(), topk_logprobs=tt.topk_logprobs, tail_logprob=tt.tail_logprob)
            del tt
        logits = student(input_ids=input_ids).logits
        sums = distill_loss(logits, input_ids, valid, alpha=alpha, **tg)
        (sums.loss_sum / n_valid).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(sums.loss_sum) / n_valid
        del logits, sums, tg
        return time.perf_counter() - t0, loss

    rss_setup = peak_rss_mib()
    t_first, loss = step()
    rss_step = peak_rss_mib()
    times = [step()[0] for _ in range(steps)]
    return dict(mode=mode, rss_setup_mib=rss_setup, rss_step_mib=rss_step, rss_end_mib=peak_rss_mib(),
                t_first_s=t_first, t_step_s=statistics.median(times), times_s=times, loss=loss,
                threads=torch.get_num_threads(),
                student_params=sum(p.numel() for p in student.parameters()),
                teacher_params=sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0)


def run_child(mode: str, args) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--vocab", str(args.vocab),
           "--seq", str(args.seq), "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"child {mode} failed (rc {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=2048, help="tokens in the one sequence of the batch (B=1)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--rounds", type=int, default=1, help="run every mode this many times, take medians")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(child(args.child, args.vocab, args.seq, args.steps)))
        return

    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            runs[mode].append(run_child(mode, args))
    med = lambda m, key: statistics.median(x[key] for x in runs[m])  # noqa: E731
    res = {m: {k: med(m, k) for k in ("rss_setup_mib", "rss_step_mib", "t_step_s", "loss")} for m in MODES}

    any_run = runs["online"][0]
    print(f"B=1, T={args.seq}, V={args.vocab}, k={K}; student {any_run['student_params'] / 1e6:.2f}M params, "
          f"online teacher {any_run['teacher_params'] / 1e6:.2f}M; torch threads {any_run['threads']}; "
          f"{args.steps} timed steps after 1 warm-up, {args.rounds} round(s)\n")
    print("| mode | peak RSS after set-up (MiB) | peak RSS, one step (MiB) | step increment (MiB) | step time (s, median) | loss |")
    print("|---|---:|---:|---:|---:|---:|")
    names = {"ce": "ce (CE only, α=1)", "kd": "kd (top-64 from cache, α=0.5)", "online": "online (teacher in memory, α=0.5)"}
    for m in MODES:
        r = res[m]
        print(f"| {names[m]} | {r['rss_setup_mib']:.0f} | {r['rss_step_mib']:.0f} | "
              f"{r['rss_step_mib'] - r['rss_setup_mib']:.0f} | {r['t_step_s']:.3f} | {r['loss']:.3f} |")
    mem_ratio = res["kd"]["rss_step_mib"] / res["ce"]["rss_step_mib"]
    thr_ratio = res["ce"]["t_step_s"] / res["kd"]["t_step_s"]
    speedup = res["online"]["t_step_s"] / res["kd"]["t_step_s"]
    print()
    print(f"peak RSS kd/ce:              {mem_ratio:.3f}  (goal <= 1.10: {'met' if mem_ratio <= 1.10 else 'NOT met'})")
    print(f"peak RSS online/ce:          {res['online']['rss_step_mib'] / res['ce']['rss_step_mib']:.3f}")
    print(f"KD throughput vs CE (t_ce/t_kd): {thr_ratio:.3f}  (goal >= 0.95: {'met' if thr_ratio >= 0.95 else 'NOT met'})")
    print(f"KD from cache vs online KD speed-up (t_online/t_kd): {speedup:.2f}x")
    print("per-step times (s): " + "; ".join(f"{m} " + ", ".join(f"{t:.3f}" for x in runs[m] for t in x["times_s"])
                                               for m in MODES))
    print(f"wall time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
