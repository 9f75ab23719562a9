"""Does choosing round 1's samples by their logged loss help? Hardest half vs a random half vs
the full set, on the real teacher (stories260K, TinyStories), through train-student's rounds.

Per seed, round 0 is one train-student run (configs/tinystories/rounds.yaml's recipe: the
tinystories student, α = 0.5, a top-k cache written by the precompute-teacher stage) of
``--steps`` optimizer steps over every sample of ``train_head.txt`` (about 2.6 epochs at the
defaults, so every sample has logged losses). Its run directory is then copied once per
(variant, learning rate) and train-student continues it with a second round of the same
``--steps`` steps, initialised from round 0's ``final/``, on:

* **hardest**: ``select: {metric: --metric, top_fraction: --fraction}`` — the samples with the
  highest logged loss per token in round 0 (the project's selection);
* **random**: ``select: {random_fraction: --fraction}`` — a seeded random subset of the same size;
* **full**: every sample (no ``select``).

Every variant gets the same learning-rate grid ``--lrs``; its learning rate is the one with
the lowest mean **dev** perplexity over the seeds (paragraphs 1–``--eval-samples`` of
``valid_a.txt``). At that learning rate the report gives, on **test** (the next
``--eval-samples`` paragraphs): perplexity, and the **hardest-decile loss** — the mean NLL per
token over the test paragraphs that were the hardest tenth (highest NLL per token) for the
seed's round-0 student; the same paragraphs for every variant of a seed.

Each train-student run is the real stage (``python -m stages.train_student``, one process,
one rank). Finished runs are skipped on a rerun; results go to ``OUT/results.jsonl`` and the
table to ``OUT/table.md``. About 25 s a run on one core; 2 + 18 runs at the defaults.

    OMP_NUM_THREADS=1 .venv/bin/python bench/selection_quality.py --realdata ../shared/realdata
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from quality import log, make_cache  # noqa: E402

VARIANTS = ("hardest", "random", "full")


@torch.no_grad()
def per_sample_nll(model_dir: str, samples, batch_size: int = 32) -> tuple[list[float], list[int]]:
    """NLL (nats, summed over the sample's next-token targets) and target count of each sample
    under the causal LM in ``model_dir`` (an HF export), in the order of ``samples``."""
    from transformers import AutoModelForCausalLM

    from pipeline.data.batch import collate

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, cnt = [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i: i + batch_size]
        b = collate(chunk)
        lp = F.log_softmax(model(input_ids=b.input_ids).logits.float()[:, :-1], -1)
        y = b.input_ids[:, 1:]
        tok = -lp.gather(-1, y[..., None]).squeeze(-1)  # (B, T-1)
        v = torch.zeros(y.shape, dtype=torch.bool)
        v.view(-1)[b.rows - b.rows // b.input_ids.shape[1]] = True  # flat (B, T) targets -> (B, T-1)
        nll += (tok * v).double().sum(1).tolist()
        cnt += v.sum(1).tolist()
    return nll, cnt


def train_student(cfg: dict, path: Path, log_path: Path) -> None:
    """Write ``cfg`` to ``path`` and run train-student on it (raises on a non-zero exit)."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with open(log_path, "a") as fh:
        rc = subprocess.run([sys.executable, "-m", "stages.train_student", "--config", str(path)], cwd=ROOT,
                            stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "WANDB_MODE": "disabled"}).returncode
    if rc != 0:
        raise RuntimeError(f"train-student failed ({rc}) on {path}; see {log_path}")


def finished_rounds(run_dir: Path) -> int:
    p = run_dir / "run.json"
    return len(json.loads(p.read_text())["rounds"]) if p.is_file() else 0


def summarize(rows: list[dict], r0: dict, args) -> str:
    """The markdown table: per variant its dev-chosen LR, test ppl and hardest-decile loss per seed."""
    lines = ["| round 1 on | best LR (dev) | test ppl per seed (mean) | hardest-decile NLL/token per seed (mean) "
             "| samples |", "|---|---:|---:|---:|---:|"]

    def fmt(vals, f):
        return " / ".join(f.format(v) for v in vals) + f" ({f.format(statistics.mean(vals))})"

    seeds = sorted({r["seed"] for r in r0.values()})
    lines.append(f"| round 0 only | {args.lr0:g} | {fmt([r0[s]['ppl'] for s in seeds], '{:.2f}')} | "
                 f"{fmt([r0[s]['hard_nll'] for s in seeds], '{:.3f}')} | all |")
    for v in VARIANTS:
        vr = [r for r in rows if r["variant"] == v]
        lrs = sorted({r["lr"] for r in vr})
        if not lrs:
            continue
        best = min(lrs, key=lambda lr: statistics.mean(r["dev_ppl"] for r in vr if r["lr"] == lr))
        at = sorted((r for r in vr if r["lr"] == best), key=lambda r: r["seed"])
        lines.append(f"| {v} | {best:g} | {fmt([r['ppl'] for r in at], '{:.2f}')} | "
                     f"{fmt([r['hard_nll'] for r in at], '{:.3f}')} | {at[0]['samples']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--realdata", required=True, help="directory with teacher-stories260K/ and tinystories/")
    p.add_argument("--out", default="runs/selection-quality")
    p.add_argument("--cache", default=None, help="an existing complete top-k train cache of train_head.txt")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--target-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of each round")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lr0", type=float, default=6e-3, help="round 0's learning rate (tuned for this student)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3], help="round 1's grid")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--metric", default="loss", choices=["loss", "ce", "kl", "distill"])
    p.add_argument("--eval-samples", type=int, default=600)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from pipeline.data.demo_corpus import llama_config
    from pipeline.config import DatasetConfig
    from pipeline.data import load_samples
    from pipeline.models import load_tokenizer

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tdir = f"{args.realdata}/teacher-stories260K"
    cache = Path(args.cache).resolve() if args.cache else make_cache(args, f"topk-k{args.k}", args.k, "topk").resolve()
    init = out / "student-init"
    llama_config(512, 32, 3, 4, 2, 86, bos_token_id=1, eos_token_id=2).save_pretrained(init)
    held = load_samples(DatasetConfig(path=f"{args.realdata}/tinystories/valid_a.txt", sample_by="paragraph",
                                      max_length=256, num_samples=2 * args.eval_samples), load_tokenizer(tdir))[0]
    dev, test = held[:args.eval_samples], held[args.eval_samples:]
    base = yaml.safe_load((ROOT / "configs/tinystories/rounds.yaml").read_text())
    base.update(student={"path": str(init), "init": "random"}, data={"train_cache": str(cache)},
                max_steps=args.steps, save_steps=10**6, eval_steps=10**6, log_steps=50)
    base["optim"]["lr"] = args.lr0

    def score(model_dir: Path, hard: list[int] | None) -> dict:
        d_nll, d_n = per_sample_nll(str(model_dir), dev)
        t_nll, t_n = per_sample_nll(str(model_dir), test)
        res = {"dev_ppl": math.exp(sum(d_nll) / sum(d_n)), "ppl": math.exp(sum(t_nll) / sum(t_n))}
        if hard is None:  # round 0: the hardest tenth of the test paragraphs for this student
            per_tok = [a / max(n, 1) for a, n in zip(t_nll, t_n)]
            hard = sorted(range(len(test)), key=lambda i: -per_tok[i])[: max(1, len(test) // 10)]
            res["hard"] = hard
        res["hard_nll"] = sum(t_nll[i] for i in hard) / sum(t_n[i] for i in hard)
        return res

    res_path = out / "results.jsonl"
    rows = [json.loads(x) for x in res_path.read_text().splitlines()] if res_path.is_file() else []
    done = {(r["variant"], r["lr"], r["seed"]) for r in rows}
    r0 = {}
    for seed in args.seeds:
        run0 = out / f"round0-s{seed}"
        if finished_rounds(run0) < 1:
            shutil.rmtree(run0, ignore_errors=True)
            run0.mkdir(parents=True)
            train_student({**base, "seed": seed, "output_dir": str(run0), "rounds": [{}]}, run0 / "in.yaml",
                          out / "train.log")
        r0[seed] = {"seed": seed, **score(run0 / "round-0" / "final", None)}
        log(f"seed {seed} round 0: test ppl {r0[seed]['ppl']:.3f}, hardest-decile NLL {r0[seed]['hard_nll']:.3f}")
        for v in VARIANTS:
            select = {"hardest": {"metric": args.metric, "top_fraction": args.fraction},
                      "random": {"random_fraction": args.fraction}, "full": None}[v]
            for lr in args.lrs:
                if (v, lr, seed) in done:
                    continue
                run = out / f"{v}-lr{lr:g}-s{seed}"
                shutil.rmtree(run, ignore_errors=True)
                shutil.copytree(run0, run)  # round 0 finished in run.json: train-student goes on with round 1
                r1 = {"optim": {"lr": lr}, **({"select": select} if select else {})}
                t0 = time.perf_counter()
                train_student({**base, "seed": seed, "output_dir": str(run), "rounds": [{}, r1]}, run / "in.yaml",
                              out / "train.log")
                state = json.loads((run / "run.json").read_text())["rounds"][1]
                row = {"variant": v, "lr": lr, "seed": seed, "steps": args.steps, "samples": state["samples"],
                       **score(run / "round-1" / "final", r0[seed]["hard"]), "wall_s": time.perf_counter() - t0}
                with open(res_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                rows.append(row)
                log(f"seed {seed} {v:>8} lr {lr:g}: dev ppl {row['dev_ppl']:.3f} test ppl {row['ppl']:.3f} "
                    f"hardest-decile NLL {row['hard_nll']:.3f} ({row['samples']} samples, {row['wall_s']:.0f}s)")
                shutil.rmtree(run / "round-0", ignore_errors=True)  # the copy of round 0 (kept in round0-s*)
    header = (f"student hidden 32 × 3 layers (configs/tinystories/run.sh), α=0.5, top-{args.k} cache of "
              f"train_head.txt; round 0: {args.steps} steps at lr {args.lr0:g}; round 1: {args.steps} steps from "
              f"round 0's final/, LR grid {args.lrs}; selection metric {args.metric} per token, fraction "
              f"{args.fraction}; dev/test: paragraphs 1–{args.eval_samples} / {args.eval_samples + 1}–"
              f"{2 * args.eval_samples} of valid_a.txt; hardest decile: the test paragraphs hardest for the "
              f"seed's round-0 student; wall {time.perf_counter() - t_start:.0f}s\n\n")
    table = summarize(rows, r0, args)
    (out / "table.md").write_text(header + table + "\n")
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
