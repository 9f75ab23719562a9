"""Distillation quality of the sparse target types on the real teacher (stories260K, TinyStories).

For every cell (CE only, dense online KD, and each target type × k) and every seed, a student
about a quarter of the teacher's size (hidden 32, 4 layers, ~62k parameters vs 260k) is trained
for the same number of optimizer steps on the same samples in the same order (the seed fixes the
student's initial weights and the sample order, so cells are compared *paired* per seed), then
evaluated on held-out text: perplexity = exp(mean CE per valid token) and expected calibration
error (ECE, 15 equal-width bins of the top-1 probability; Guo et al., "On Calibration of Modern
Neural Networks", ICML 2017, eq. 3). Every cell runs through the same code: ``Trainer.train_step``
and ``distill_loss`` of pipeline/. Dense online KD runs the teacher on each micro-batch and passes
its full distribution as a V-wide support (``tail: bucket`` with an empty tail is exactly the
dense KL, tests/test_targets.py); train-student has no online mode.

Caches are written by the ``precompute-teacher`` stage with configs/tinystories/precompute.yaml
(reused across seeds and reruns); bytes/token = bytes of the closed shards (pipeline.cache.cache_bytes)
/ cached tokens. Results are appended to ``OUT/results.jsonl`` as each run finishes (a rerun
skips finished runs); the table goes to ``OUT/table.md``.

    OMP_NUM_THREADS=1 nohup .venv/bin/python bench/quality.py --realdata ../shared/realdata \\
        > runs/quality.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- caches
def make_cache(args, name: str, k: int, target_type: str) -> Path:
    """The train cache of one target type and k, written by the precompute-teacher stage's code
    (``pipeline.teacher.precompute.precompute`` with configs/tinystories/precompute.yaml); reused if complete."""
    from pipeline.cache import read_manifest

    d = Path(args.out) / "caches" / name
    if (d / "manifest.json").is_file() and read_manifest(d).complete:
        return d
    over = [f"teachers=[{{path: {args.realdata}/teacher-stories260K}}]",
            f"dataset.path={args.realdata}/tinystories/train_head.txt", f"cache.dir={d}", f"cache.k={k}",
            "cache.overwrite=true", f"targets.type={target_type}"]
    if target_type != "topk":
        over.append(f"targets.seed={args.target_seed}")
    t0 = time.perf_counter()  # the stage's own config and function, in this process (no start-up per cache)
    from pipeline.config import PrecomputeConfig, load_config
    from pipeline.distributed import init_distributed
    from pipeline.teacher.precompute import precompute

    precompute(load_config(PrecomputeConfig, ROOT / "configs/tinystories/precompute.yaml", over), init_distributed("cpu"))
    log(f"cache {name}: {time.perf_counter() - t0:.1f}s")
    return d


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, samples, batch_size: int = 32, bins: int = 15) -> dict:
    """Held-out CE per valid token, perplexity and top-1 ECE of a causal LM.

    ECE = Σ_b (n_b / N) · |acc_b − conf_b| over ``bins`` equal-width bins of the top-1
    probability (Guo et al. 2017, eq. 3); accuracy = argmax equals the next token.
    """
    from pipeline.data.batch import collate
    from pipeline.models import OutputProjection

    model.eval()
    nll, n = 0.0, 0
    conf_all, hit_all = [], []
    for i in range(0, len(samples), batch_size):
        b = collate(samples[i: i + batch_size])
        out = model(input_ids=b.input_ids).logits
        head = model.get_output_embeddings()
        if isinstance(head, OutputProjection):  # trained by pipeline.student.step: the forward returns hidden states
            out = out @ head.weight.t()  # (B, T, V); the root's weight stays unsharded after the forward
        lp = F.log_softmax(out.float()[:, :-1], -1)
        y = b.input_ids[:, 1:]
        v = torch.zeros(y.shape, dtype=torch.bool)
        v.view(-1)[b.rows - b.rows // b.input_ids.shape[1]] = True  # flat (B, T) positions -> (B, T-1)
        nll += float(-lp.gather(-1, y[..., None]).squeeze(-1)[v].double().sum())
        n += int(v.sum())
        top, arg = lp[v].max(-1)
        conf_all.append(top.exp())
        hit_all.append((arg == y[v]).float())
    conf, hit = torch.cat(conf_all).double(), torch.cat(hit_all).double()
    idx = (conf * bins).long().clamp(max=bins - 1)
    cnt = torch.bincount(idx, minlength=bins).double()
    gap = (torch.bincount(idx, hit, minlength=bins) - torch.bincount(idx, conf, minlength=bins)).abs()
    ce = nll / n
    return {"ce": ce, "ppl": math.exp(ce), "ece": float(gap.sum() / cnt.sum()), "top1_acc": float(hit.mean()), "n_tokens": n}


# ----------------------------------------------------------------------------- training
def dense_batch(teacher, batch):
    """The batch with the teacher's full distribution as targets (support = all V ids, empty tail)."""
    import dataclasses

    with torch.no_grad():
        lp = F.log_softmax(teacher(input_ids=batch.input_ids, use_cache=False).logits.float(), -1)
    V = lp.shape[-1]
    lp = lp.reshape(-1, V)[batch.rows]  # (N, V) at the valid positions
    return dataclasses.replace(batch, topk_ids=torch.arange(V).expand(len(lp), V), topk_logprobs=lp.contiguous(),
                               tail_logprob=torch.full((len(lp),), -math.inf))


def train_one(args, cell: dict, seed: int, src, order: list[int], eval_samples, teacher) -> dict:
    """Train one student for ``args.steps`` steps and evaluate it (single process, FSDP2 world size 1)."""
    from pipeline.config import LossConfig, OptimConfig
    from pipeline.distributed import shard_model
    from pipeline.student.sampler import StepSampler
    from pipeline.data.batch import collate
    from pipeline.models import build_student, defer_output_projection
    from pipeline.student.step import Trainer, build_optimizer, lr_lambda

    model = build_student(args.student_dir, "random", seed)
    defer_output_projection(model)  # before fully_shard, as train-student does
    shard_model(model)
    ocfg = OptimConfig(lr=cell["lr"], warmup_steps=20, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1,
                       max_grad_norm=1.0)
    opt = build_optimizer(model, ocfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ocfg, args.steps))
    trainer = Trainer(model, opt, sched, LossConfig(alpha=cell["alpha"], temperature=1.0, tail=cell["tail"]),
                      ocfg.max_grad_norm, torch.device("cpu"))
    sampler = StepSampler(np.arange(len(order)), args.micro_batch, 1, 0, 1, seed)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        batch = collate([src[order[i]] for i in sampler.next_step()[0]])
        if cell["name"] == "dense":
            batch = dense_batch(teacher, batch)
        stats = trainer.train_step([batch])
    train_s = time.perf_counter() - t0
    ev = evaluate(model, eval_samples)
    return {**ev, "train_s": train_s, "final_train_loss": stats.loss}


# ----------------------------------------------------------------------------- report
def summarize(rows: list[dict], cache_info: dict, teacher_ev: dict, args) -> str:
    """Markdown table: mean ± sd (min–max) per cell, paired differences against CE and dense KD."""
    cells: dict[str, dict[int, dict]] = {}
    for r in rows:
        cells.setdefault(r["cell"], {})[r["seed"]] = r
    names = [c for c in cell_names(args) if c in cells]

    def paired(a: str, b: str, key: str) -> tuple[float, float, float, int] | None:
        seeds = sorted(set(cells.get(a, {})) & set(cells.get(b, {})))
        if not seeds:
            return None
        d = np.array([cells[a][s][key] - cells[b][s][key] for s in seeds])
        return float(d.mean()), float(d.min()), float(d.max()), len(seeds)

    def verdict(a: str, b: str, key: str, fmt: str = "+.2f") -> str:
        """Mean paired difference a − b over common seeds; ``*`` paired t-test significant at 5%
        (two-sided), ``**`` also larger than either cell's seed spread (max − min)."""
        p = paired(a, b, key)
        if p is None or a == b:
            return ""
        mean, lo, hi, n = p
        d = np.array([cells[a][s][key] - cells[b][s][key] for s in sorted(set(cells[a]) & set(cells[b]))])
        t = abs(mean) / (d.std(ddof=1) / math.sqrt(n)) if n > 1 and d.std(ddof=1) > 0 else 0.0
        spread = max(np.ptp([r[key] for r in cells[a].values()]), np.ptp([r[key] for r in cells[b].values()]))
        mark = ("**" if abs(mean) > spread else "*") if n > 1 and t > T_CRIT[min(n - 1, 10)] else ""
        return f"{mark}{mean:{fmt}}{mark}"

    lines = ["| cell | bytes/token | ppl mean ± sd (min–max) | Δppl vs CE | Δppl vs dense | ECE mean ± sd | ΔECE vs dense | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in names:
        ppl = np.array([r["ppl"] for r in cells[c].values()])
        ece = np.array([r["ece"] for r in cells[c].values()])
        bpt = cache_info.get(c.replace("-renorm", ""), {}).get("bytes_per_token")
        lines.append(f"| {c} | {'' if bpt is None else f'{bpt:.1f}'} | {ppl.mean():.2f} ± {ppl.std(ddof=1) if len(ppl) > 1 else 0:.2f} "
                     f"({ppl.min():.2f}–{ppl.max():.2f}) | {verdict(c, 'ce', 'ppl')} | {verdict(c, 'dense', 'ppl')} | "
                     f"{ece.mean():.4f} ± {ece.std(ddof=1) if len(ece) > 1 else 0:.4f} | {verdict(c, 'dense', 'ece', '+.4f')} | {len(ppl)} |")
    lines.append(f"| teacher stories260K | | {teacher_ev['ppl']:.2f} | | | {teacher_ev['ece']:.4f} | | |")
    return "\n".join(lines)


T_CRIT = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
"""Two-sided 5% critical values of Student's t by degrees of freedom (10 stands for ≥ 10)."""


def cell_names(args) -> list[str]:
    return (["ce", "dense"] + [f"{t}-k{k}" for t in args.types for k in args.ks]
            + [f"topk-renorm-k{k}" for k in args.renorm_ks])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--realdata", required=True, help="directory with teacher-stories260K/ and tinystories/")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 64])
    p.add_argument("--types", nargs="+", default=["topk", "sampled", "topk+sampled"])
    p.add_argument("--topk-tail", default="bucket", choices=["bucket", "renormalize"],
                   help="loss.tail for topk caches (sampled types always use loss.tail=sampled)")
    p.add_argument("--renorm-ks", type=int, nargs="*", default=[],
                   help="also train on these topk caches with loss.tail=renormalize (the biased baseline)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--lr-ce", type=float, default=4.2e-3, help="CE-only LR (best of the sweep in docs/results.md)")
    p.add_argument("--lr-kd", type=float, default=6e-3, help="LR of every distilled student")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=600)
    p.add_argument("--target-seed", type=int, default=0)
    p.add_argument("--student", default="32,4,4,2,86", help="hidden,layers,heads,kv_heads,ffn")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from pipeline.data.demo_corpus import llama_config
    from pipeline.cache import cache_bytes, open_cache, read_manifest
    from pipeline.config import DatasetConfig
    from pipeline.data import load_samples
    from pipeline.distributed import init_distributed, teardown
    from pipeline.models import build_student, count_parameters, load_teacher, load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init_distributed("cpu")  # a one-rank gloo group, as the stages use
    t_start = time.perf_counter()
    h, L, nh, kv, ffn = (int(x) for x in args.student.split(","))
    args.student_dir = str(out / "student-init")
    llama_config(512, h, L, nh, kv, ffn, bos_token_id=1, eos_token_id=2).save_pretrained(args.student_dir)
    tdir = f"{args.realdata}/teacher-stories260K"
    teacher = load_teacher(tdir)
    n_student, n_teacher = count_parameters(build_student(args.student_dir, "random", 0)), count_parameters(teacher)
    log(f"student {n_student} params, teacher {n_teacher} ({n_student / n_teacher:.2f}×)")

    cache_info: dict[str, dict] = {}
    caches: dict[str, Path] = {}
    for t in args.types:
        for k in args.ks:
            name = f"{t}-k{k}"
            d = make_cache(args, name, k, t)
            m = read_manifest(d)
            caches[name] = d
            n_bytes = cache_bytes(d)
            cache_info[name] = {"bytes": n_bytes, "tokens": m.num_tokens, "bytes_per_token": n_bytes / m.num_tokens,
                                "num_draws": m.num_draws, "head_k": m.head_k}
    (out / "caches.json").write_text(json.dumps(cache_info, indent=1))
    log(f"caches ready ({time.perf_counter() - t_start:.0f}s)")

    tok = load_tokenizer(tdir)
    eval_samples = load_samples(DatasetConfig(path=f"{args.realdata}/tinystories/valid_a.txt", sample_by="paragraph",
                                              max_length=256, num_samples=args.eval_samples), tok)[0]
    teacher_ev = evaluate(teacher, eval_samples)
    log(f"teacher held-out: {teacher_ev}")
    srcs = {name: open_cache(d) for name, d in caches.items()}  # full validation
    ref = next(iter(srcs.values()))
    ids = sorted(ref.sample_ids)  # one canonical sample order shared by every cache and cell
    orders = {name: [s.index_of(i) for i in ids] for name, s in srcs.items()}

    cells = [{"name": "ce", "alpha": 1.0, "tail": "bucket", "lr": args.lr_ce, "src": next(iter(srcs))},
             {"name": "dense", "alpha": args.alpha, "tail": "bucket", "lr": args.lr_kd, "src": next(iter(srcs))}]
    for name in caches:
        tail = args.topk_tail if name.startswith("topk-") else "sampled"
        cells.append({"name": name, "alpha": args.alpha, "tail": tail, "lr": args.lr_kd, "src": name})
    for k in args.renorm_ks:  # the biased baseline: topk caches with loss.tail=renormalize
        cells.append({"name": f"topk-renorm-k{k}", "alpha": args.alpha, "tail": "renormalize", "lr": args.lr_kd,
                      "src": f"topk-k{k}"})
    res_path = out / "results.jsonl"
    rows = [json.loads(x) for x in res_path.read_text().splitlines()] if res_path.is_file() else []
    done = {(r["cell"], r["seed"]) for r in rows}
    try:
        for seed in args.seeds:
            for cell in cells:
                if (cell["name"], seed) in done:
                    continue
                r = train_one(args, cell, seed, srcs[cell["src"]], orders[cell["src"]], eval_samples, teacher)
                row = {"cell": cell["name"], "seed": seed, "steps": args.steps, "alpha": cell["alpha"],
                       "tail": cell["tail"], "lr": cell["lr"], **r}
                rows.append(row)
                with open(res_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                log(f"seed {seed} {cell['name']:>16}: ppl {r['ppl']:.3f} ece {r['ece']:.4f} ({r['train_s']:.0f}s train)")
    finally:
        teardown()
    table = summarize(rows, cache_info, teacher_ev, args)
    header = (f"student {n_student} params ({n_student / n_teacher:.2f}× the teacher's {n_teacher}); {args.steps} steps of "
              f"{args.micro_batch} sequences; α={args.alpha}, τ=1; lr CE {args.lr_ce}, KD {args.lr_kd}; held-out: first "
              f"{args.eval_samples} paragraphs of valid_a.txt ({teacher_ev['n_tokens']} tokens); wall "
              f"{time.perf_counter() - t_start:.0f}s\n\n")
    (out / "table.md").write_text(header + table + "\n")
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
