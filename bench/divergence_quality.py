"""Which divergence distils best: every ``loss.divergence`` on the real teacher (stories260K,
TinyStories), each at its own best learning rate, against CE only.

For every cell (CE only, and each divergence at α = 0.5, τ = 1, ``tail: bucket`` on one top-k
cache written by the precompute-teacher stage) and every learning rate of ``--lrs`` and seed of
``--seeds``, a student a quarter of the teacher's size (hidden 32, 4 layers) is trained for the
same number of optimizer steps on the same samples in the same order (the seed fixes the
initial weights and the order: cells are paired per seed) through ``Trainer.train_step``, the
code train-student runs. Held-out text is split in two disjoint halves of ``valid_a.txt``:

* **dev** (the first ``--eval-samples`` paragraphs): each cell's learning rate is the one with
  the lowest mean dev perplexity over the seeds (every cell, CE included, gets the same grid);
* **test** (the next ``--eval-samples`` paragraphs), at that learning rate: perplexity,
  expected calibration error (ECE, 15 bins of the top-1 probability; Guo et al. 2017, eq. 3),
  and generation quality: the student samples a continuation (temperature 1, ``--gen-tokens``
  new tokens) of each of ``--prompts`` story openings (the first ``--prompt-tokens`` tokens of
  test paragraphs), and the report gives the **teacher's NLL per token** of those continuations
  (how likely the teacher finds what the student writes; lower is better) and **distinct-2**
  (unique bigrams ÷ bigrams over all continuations; Li et al., "A Diversity-Promoting
  Objective Function for Neural Conversation Models", NAACL 2016).

Results are appended to ``OUT/results.jsonl`` as each run finishes (a rerun skips finished
runs); the table goes to ``OUT/table.md``. About 40 s a run on one core.

    OMP_NUM_THREADS=1 .venv/bin/python bench/divergence_quality.py --realdata ../shared/realdata
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
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from quality import T_CRIT, evaluate, log, make_cache  # noqa: E402


@torch.no_grad()
def generation_quality(student_dir: str, teacher, prompts: list[list[int]], new_tokens: int, seed: int) -> dict:
    """Sample one continuation per prompt from the exported student and score it.

    Args:
        student_dir: an HF model directory (the student's export).
        teacher: the teacher model (scores the continuations).
        prompts: token-id lists (BOS first), all the same length.
        new_tokens: tokens sampled per prompt (temperature 1, no top-k/top-p; EOS ends one).
        seed: ``torch.manual_seed`` for the sampling.
    Returns:
        ``teacher_nll`` (nats per continuation token, under the teacher), ``distinct_2``,
        ``gen_tokens`` (continuation tokens scored).
    """
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    x = torch.tensor(prompts)
    torch.manual_seed(seed)
    out = student.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=2)
    P = x.shape[1]
    cont = out[:, P:]
    # tokens after the first EOS are padding; the EOS itself is scored
    after_eos = torch.cumsum((cont == 2).long(), 1) - (cont == 2).long() > 0
    valid = ~after_eos
    lp = F.log_softmax(teacher(input_ids=out, use_cache=False).logits.float(), -1)[:, P - 1:-1]
    nll = -lp.gather(-1, cont[..., None]).squeeze(-1)
    n = int(valid.sum())
    bigrams, total = set(), 0
    for row, v in zip(cont.tolist(), valid.tolist()):
        toks = [t for t, keep in zip(row, v) if keep]
        pairs = list(zip(toks, toks[1:]))
        bigrams.update(pairs)
        total += len(pairs)
    return {"teacher_nll": float(nll[valid].double().sum()) / max(n, 1), "distinct_2": len(bigrams) / max(total, 1),
            "gen_tokens": n}


def train_one(args, cell: dict, lr: float, seed: int, src, order: list[int], dev, test, teacher, prompts,
              tok_dir: str) -> dict:
    """Train one student, evaluate it on dev and test, export it and score its generations."""
    from pipeline.config import LossConfig, OptimConfig
    from pipeline.data.batch import collate
    from pipeline.distributed import shard_model
    from pipeline.models import build_student, defer_output_projection
    from pipeline.student.checkpoint import export_hf
    from pipeline.student.sampler import StepSampler
    from pipeline.student.step import Trainer, build_optimizer, lr_lambda

    model = build_student(args.student_dir, "random", seed)
    defer_output_projection(model)  # before fully_shard, as train-student does
    shard_model(model)
    ocfg = OptimConfig(lr=lr, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1,
                       max_grad_norm=1.0)
    opt = build_optimizer(model, ocfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ocfg, args.steps))
    loss = LossConfig(alpha=cell["alpha"], temperature=1.0, tail="bucket", divergence=cell["divergence"],
                      beta=args.beta, skew=args.skew)
    trainer = Trainer(model, opt, sched, loss, ocfg.max_grad_norm, torch.device("cpu"))
    sampler = StepSampler(np.arange(len(order)), args.micro_batch, 1, 0, 1, seed)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        stats = trainer.train_step([collate([src[order[i]] for i in sampler.next_step()[0]])])
    train_s = time.perf_counter() - t0
    ev_dev, ev_test = evaluate(model, dev), evaluate(model, test)
    export = Path(args.out) / "students" / f"{cell['name']}-lr{lr:g}-s{seed}"
    export_hf(model, export, tok_dir, 0)
    gen = generation_quality(str(export), teacher, prompts, args.gen_tokens, seed)
    return {"dev_ppl": ev_dev["ppl"], "ppl": ev_test["ppl"], "ece": ev_test["ece"], "top1_acc": ev_test["top1_acc"],
            **gen, "train_s": train_s, "final_train_loss": stats.loss, "final_train_distill": stats.distill}


def summarize(rows: list[dict], teacher_row: dict, args) -> str:
    """Markdown table: per cell its chosen LR (lowest mean dev ppl) and, at that LR, test ppl,
    ECE, teacher NLL of its generations and distinct-2 per seed and their mean, with the mean
    paired difference against CE (``*`` paired t-test significant at 5%, ``**`` also larger than
    both cells' seed spreads)."""
    by: dict[str, dict[float, dict[int, dict]]] = {}
    for r in rows:
        by.setdefault(r["cell"], {}).setdefault(r["lr"], {})[r["seed"]] = r
    best = {c: min(lrs, key=lambda lr: np.mean([x["dev_ppl"] for x in lrs[lr].values()])) for c, lrs in by.items()}

    def cell_rows(c):
        return by[c][best[c]]

    def vs_ce(c, key, fmt):
        if c == "ce" or "ce" not in by:
            return ""
        a, b = cell_rows(c), cell_rows("ce")
        seeds = sorted(set(a) & set(b))
        d = np.array([a[s][key] - b[s][key] for s in seeds])
        n = len(d)
        t = abs(d.mean()) / (d.std(ddof=1) / math.sqrt(n)) if n > 1 and d.std(ddof=1) > 0 else 0.0
        spread = max(np.ptp([a[s][key] for s in seeds]), np.ptp([b[s][key] for s in seeds]))
        mark = ("**" if abs(d.mean()) > spread else "*") if n > 1 and t > T_CRIT[min(n - 1, 10)] else ""
        return f"{mark}{d.mean():{fmt}}{mark}"

    def per_seed(c, key, fmt):
        xs = cell_rows(c)
        return " / ".join(f"{xs[s][key]:{fmt}}" for s in sorted(xs)) + f" ({np.mean([x[key] for x in xs.values()]):{fmt}})"

    lines = ["| cell | best LR (dev) | test ppl per seed (mean) | Δppl vs CE | ECE (mean) | teacher NLL of generations "
             "(mean) | Δ vs CE | distinct-2 (mean) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = ["ce"] + [c for c in by if c != "ce"]
    for c in order:
        if c not in by:
            continue
        lines.append(f"| {c} | {best[c]:g} | {per_seed(c, 'ppl', '.2f')} | {vs_ce(c, 'ppl', '+.2f')} | "
                     f"{per_seed(c, 'ece', '.4f')} | {per_seed(c, 'teacher_nll', '.3f')} | {vs_ce(c, 'teacher_nll', '+.3f')} | "
                     f"{per_seed(c, 'distinct_2', '.3f')} |")
    lines.append(f"| teacher stories260K | | {teacher_row['ppl']:.2f} | | {teacher_row['ece']:.4f} | "
                 f"{teacher_row['teacher_nll']:.3f} (own samples) | | {teacher_row['distinct_2']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from pipeline.student.divergences import DIVERGENCES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--realdata", required=True, help="directory with teacher-stories260K/ and tinystories/")
    p.add_argument("--out", default="runs/divergence-quality")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 6e-3, 1.2e-2])
    p.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), choices=DIVERGENCES)
    p.add_argument("--beta", type=float, default=0.5, help="loss.beta of jsd")
    p.add_argument("--skew", type=float, default=0.1, help="loss.skew of the skew KLs")
    p.add_argument("--k", type=int, default=32, help="top-k of the cache (configs/tinystories/precompute.yaml: 32)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=600)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--target-seed", type=int, default=0)
    p.add_argument("--shard", default="0/1", help="I/N: run every N-th (cell, lr, seed) from the I-th (parallel "
                   "processes share OUT/results.jsonl)")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from pipeline.data.demo_corpus import llama_config
    from pipeline.cache import open_cache
    from pipeline.config import DatasetConfig
    from pipeline.data import load_samples
    from pipeline.distributed import init_distributed, teardown
    from pipeline.models import load_teacher, load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init_distributed("cpu")
    t_start = time.perf_counter()
    args.student_dir = str(out / "student-init")
    llama_config(512, 32, 4, 4, 2, 86, bos_token_id=1, eos_token_id=2).save_pretrained(args.student_dir)
    tdir = f"{args.realdata}/teacher-stories260K"
    teacher = load_teacher(tdir).eval()
    cache = make_cache(args, f"topk-k{args.k}", args.k, "topk")
    src = open_cache(cache)
    order = [src.index_of(i) for i in sorted(src.sample_ids)]
    tok = load_tokenizer(tdir)
    held = load_samples(DatasetConfig(path=f"{args.realdata}/tinystories/valid_a.txt", sample_by="paragraph",
                                      max_length=256, num_samples=2 * args.eval_samples), tok)[0]
    dev, test = held[:args.eval_samples], held[args.eval_samples:]
    prompts = [list(s.input_ids[:args.prompt_tokens]) for s in test if len(s.input_ids) > args.prompt_tokens]
    prompts = prompts[:args.prompts]
    teacher_row = {**evaluate(teacher, test), **generation_quality(tdir, teacher, prompts, args.gen_tokens, 0)}
    log(f"teacher: test ppl {teacher_row['ppl']:.3f}, NLL of its own samples {teacher_row['teacher_nll']:.3f}")
    cells = [{"name": "ce", "alpha": 1.0, "divergence": "forward_kl"}]
    cells += [{"name": d, "alpha": args.alpha, "divergence": d} for d in args.divergences]
    res_path = out / "results.jsonl"
    rows = [json.loads(x) for x in res_path.read_text().splitlines()] if res_path.is_file() else []
    done = {(r["cell"], r["lr"], r["seed"]) for r in rows}
    i_shard, n_shard = (int(x) for x in args.shard.split("/"))
    jobs = [(c, lr, s) for s in args.seeds for c in cells for lr in args.lrs]
    try:
        for j, (cell, lr, seed) in enumerate(jobs):
            if j % n_shard != i_shard or (cell["name"], lr, seed) in done:
                continue
            r = train_one(args, cell, lr, seed, src, order, dev, test, teacher, prompts, tdir)
            row = {"cell": cell["name"], "lr": lr, "seed": seed, "steps": args.steps, "alpha": cell["alpha"], **r}
            with open(res_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            log(f"seed {seed} {cell['name']:>16} lr {lr:g}: dev ppl {r['dev_ppl']:.3f} test ppl {r['ppl']:.3f} "
                f"gen NLL {r['teacher_nll']:.3f} distinct-2 {r['distinct_2']:.3f} ({r['train_s']:.0f}s)")
    finally:
        teardown()
    rows = [json.loads(x) for x in res_path.read_text().splitlines()]
    header = (f"student 4 layers × hidden 32 (a quarter of the teacher's parameters); {args.steps} steps of "
              f"{args.micro_batch} sequences of train_head.txt; top-{args.k} cache, tail bucket, α={args.alpha}, τ=1, "
              f"jsd β={args.beta}, skew λ={args.skew}; LR grid {args.lrs}; dev/test: paragraphs 1–{args.eval_samples} / "
              f"{args.eval_samples + 1}–{2 * args.eval_samples} of valid_a.txt; generations: {len(prompts)} openings of "
              f"{args.prompt_tokens} tokens, {args.gen_tokens} new tokens at temperature 1; wall "
              f"{time.perf_counter() - t_start:.0f}s\n\n")
    table = summarize(rows, teacher_row, args)
    (out / "table.md").write_text(header + table + "\n")
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
