"""``make demo``: the whole pipeline on the embedded default data, one readable step at a time.

1. corpus     the Python standard library source → a ``datasets`` DatasetDict (train/validation)
2. tokenizer  byte-level BPE, vocabulary 4096, trained on the train split
3. teacher    a 3.1M-parameter Llama (hidden 192, 4 layers) pretrained by ``train-student`` in CE-only mode (cached)
4. cache      ``precompute-teacher``: top-32 logprobs for the students' data and the held-out set
5. students   ``train-student``: CE only (alpha=1) and distilled (alpha=0.5), two seeds each
6. verdict    held-out perplexities → ``runs/demo/summary.json``, then ``inspect-losses``

Every stage is run as the command a user would type; the command is printed first.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BUILD, RUNS = Path("data/build"), Path("runs/demo")
SEEDS = (0, 1)


def say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def run(args: list[str]) -> None:
    """Run a stage as a subprocess, echoing the command; exit on failure."""
    print("$ " + " ".join(args), flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    if subprocess.run([sys.executable, "-m", *args], env=env).returncode != 0:
        sys.exit(f"demo: step failed: {' '.join(args)}")


def run_parallel(commands: list[list[str]], logs: list[Path]) -> None:
    """Run stages side by side (one thread each: small models scale better over processes than
    over threads on 2 cores), each writing to its own log; exit if any fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    procs = []
    for args, log in zip(commands, logs):
        print("$ " + " ".join(args) + f"  > {log}", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT))
    for p, log in zip(procs, logs):
        if p.wait() != 0:
            sys.exit(f"demo: step failed, see {log}")


def build_assets() -> None:
    from pipeline.data.demo_corpus import build_corpus, llama_config, train_tokenizer

    if not (BUILD / "stdlib" / "dataset_dict.json").exists():
        say("1/6 corpus: Python standard library source → data/build/stdlib")
        dd = build_corpus(BUILD / "stdlib", max_chars=850)
        print({k: len(v) for k, v in dd.items()}, "rows")
    else:
        say("1/6 corpus: reusing data/build/stdlib")
    if not (BUILD / "tokenizer" / "tokenizer.json").exists():
        say("2/6 tokenizer: byte-level BPE, 4096 tokens → data/build/tokenizer")
        import datasets

        train_tokenizer(datasets.load_from_disk(str(BUILD / "stdlib"))["train"]["text"][:], 4096, BUILD / "tokenizer")
    else:
        say("2/6 tokenizer: reusing data/build/tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUILD / "tokenizer"))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    llama_config(len(tok), 192, 4, 6, 3, 768, **ids).save_pretrained(BUILD / "teacher-init")
    llama_config(len(tok), 64, 2, 4, 2, 256, **ids).save_pretrained(BUILD / "student-init")


def build_teacher() -> None:
    stamp_src = Path("configs/demo/teacher.yaml").read_bytes() + (BUILD / "teacher-init" / "config.json").read_bytes()
    stamp = hashlib.sha256(stamp_src + sys.version.encode()).hexdigest()[:16]
    stamp_file = BUILD / "teacher-run" / "stamp"
    if (BUILD / "teacher-run" / "final" / "model.safetensors").exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        say("3/6 teacher: reusing data/build/teacher-run/final (delete data/build to rebuild)")
        return
    say("3/6 teacher: pretraining a 3.1M-parameter Llama on the whole corpus (~6 min, CE only)")
    run(["stages.train_student", "--config", "configs/demo/teacher.yaml"])
    stamp_file.write_text(stamp)


def ppl(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["final_eval"]["perplexity"]


def main(argv: list[str] | None = None) -> None:
    import argparse

    argparse.ArgumentParser(prog="python -m stages.demo", description=__doc__,  # no options
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    t0 = time.time()
    os.environ.setdefault("WANDB_SILENT", "true")
    build_assets()
    build_teacher()
    say("4/6 cache: teacher top-32 logprobs for the students' 500 training samples and the held-out split")
    run(["stages.precompute_teacher", "--config", "configs/demo/precompute.yaml", "cache.overwrite=true"])
    run(["stages.precompute_teacher", "--config", "configs/demo/precompute.yaml", "dataset.split=validation",
         "dataset.num_samples=null", f"cache.dir={RUNS / 'cache-eval'}", "cache.overwrite=true"])
    from pipeline.cache import read_manifest

    m = read_manifest(RUNS / "cache-eval")
    teacher_ppl = m.teacher_perplexity
    results: dict[str, list[float]] = {"ce": [], "kd": []}
    for name, alpha in (("ce", 1.0), ("kd", 0.5)):
        say(f"5/6 students {name.upper()} (alpha={alpha}), seeds {SEEDS} in parallel, one thread each")
        runs = [RUNS / f"student-{name}-seed{seed}" for seed in SEEDS]
        run_parallel([["stages.train_student", "--config", "configs/demo/student.yaml", f"output_dir={out}",
                       f"loss.alpha={alpha}", f"seed={seed}", f"wandb.name={name}-seed{seed}"]
                      for seed, out in zip(SEEDS, runs)], [Path(f"{out}.log") for out in runs])
        results[name] = [ppl(out) for out in runs]
        print(f"held-out perplexity per seed: {', '.join(f'{x:.2f}' for x in results[name])}", flush=True)
    ce, kd = np.mean(results["ce"]), np.mean(results["kd"])
    spread = max(np.ptp(results["ce"]), np.ptp(results["kd"]))
    summary = {"teacher_ppl": teacher_ppl, "ce_student_ppl": float(ce), "kd_student_ppl": float(kd),
               "ce_student_ppl_per_seed": results["ce"], "kd_student_ppl_per_seed": results["kd"],
               "seed_spread": float(spread), "kd_beats_ce_beyond_spread": bool(ce - kd > spread),
               "eval_tokens": m.num_valid_positions, "wall_s": time.time() - t0,
               "teacher_params": json.loads((BUILD / "teacher-run" / "summary.json").read_text())["num_parameters"],
               "student_params": json.loads((RUNS / "student-ce-seed0" / "summary.json").read_text())["num_parameters"]}
    (RUNS / "summary.json").write_text(json.dumps(summary, indent=1))
    say("6/6 inspect-losses on the distilled student (seed 0)")
    run(["stages.inspect_losses", str(RUNS / "student-kd-seed0"), "--top", "5"])
    say("verdict: held-out perplexity (validation split, %d target tokens)" % m.num_valid_positions)
    tp, sp = summary["teacher_params"] / 1e6, summary["student_params"] / 1e6
    seeds = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"  {f'teacher ({tp:.2f}M params)':<36}{teacher_ppl:8.2f}")
    print(f"  {f'student ({sp:.2f}M) CE only, alpha=1':<36}{ce:8.2f}   seeds: {seeds(results['ce'])}")
    print(f"  {f'student ({sp:.2f}M) distilled, alpha=0.5':<36}{kd:8.2f}   seeds: {seeds(results['kd'])}")
    verdict = "beats" if summary["kd_beats_ce_beyond_spread"] else "does NOT beat"
    print(f"  distilled {verdict} CE-only by more than the seed spread ({ce - kd:.2f} vs {spread:.2f})")
    print(f"  wall time {summary['wall_s']:.0f}s; written to {RUNS / 'summary.json'}")


if __name__ == "__main__":
    main()
