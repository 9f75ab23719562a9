"""Stage one against a bare teacher forward, its memory against dataset size, and per-rank
memory with a large teacher — measured in one run.

Sections (``--only`` selects some; all by default):

* ``speed``: ``precompute-teacher``'s teacher loop (FSDP2-wrapped teacher, fused chunked
  top-k + tail, records handed to the background cache writer, the loop's time includes the
  writer's last shard) in tokens/s, against **the bare forward a user would write**: the same
  teacher loaded with ``AutoModelForCausalLM.from_pretrained`` (no FSDP), called as
  ``model(input_ids=ids).logits`` under ``torch.no_grad`` over exactly the same length-sorted
  batches, nothing else. Teachers: random tied Llamas, hidden 512, 6 layers, 8 heads, FFN 1376,
  with V = 32,000 and V = 512 (a byte-level BPE trained on the standard-library corpus; the
  32,000 one has unused added tokens up to 32,000, so the output layer and softmax have the
  full width); windows of 512 tokens (``overflow: window``), batches of 8, k = 64, 1 rank,
  ``OMP_NUM_THREADS`` threads (default 2). Each mode runs in its own child process, in
  alternating order, ``--rounds`` times; the ratio of medians is printed.
  Goals: ≥ 0.9 at V = 32,000, ≥ 0.95 at V = 512.
* ``data``: peak RSS of ``precompute-teacher`` (1 rank, a tiny teacher: hidden 32, 2 layers,
  V = 2,048, k = 8) over ≈ 1 M and ≈ 4 M tokens of the corpus. Goal: growth ≤ 100 MB.
* ``teacher``: per-rank peak RSS at 1 and 2 ranks (``torchrun``, gloo, 1 thread per rank) of the
  same small run (64 TinyStories paragraphs, max_length 128, batch 16, k = 32, the stories260K
  tokenizer) with the real stories260K teacher and with a random 155M-parameter Llama (hidden
  768, 21 layers, V = 32,000 rows sliced to the tokenizer's 512); needs ``--realdata``.
  Goal: per rank at 2 ranks ≤ stories260K's + 0.6 × the teacher's parameter bytes.

Run (from the repository root, nothing else running; about 10-15 minutes on 2 CPU cores)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/precompute_bench.py [--realdata ../shared/realdata] [--only speed data teacher]

On a GPU (``--device cuda``, section ``speed`` only): precompute loads the teacher in bf16 on
the device (as ``precompute-teacher`` does there), and so does the bare forward
(``from_pretrained(dtype=torch.bfloat16).to("cuda")``); both are timed to a
``torch.cuda.synchronize()``, and each child also reports its peak device memory
(``torch.cuda.max_memory_allocated``). ``--vocabs``, the teacher's shape options and the data
options (``--max-length``, ``--batch-size``, ``--k``, ``--samples``, ``--corpus-files``) size it;
``--json`` writes the results; ``--in-process`` runs every mode in this process (a smoke test:
peak RSS then means nothing). The defaults are the CPU run above.

Read the ratios, not the absolute numbers: the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20
IN_PROCESS = False  # --in-process: modes run in this process, not in fresh children


# ----------------------------------------------------------------------------- assets
def _tokenizer(d: Path, texts, vocab: int, pad_to: int | None = None) -> str:
    from pipeline.data.demo_corpus import train_tokenizer

    tok = train_tokenizer(texts, vocab, d)
    if pad_to and len(tok) < pad_to:  # unused tokens: the output layer and softmax get the full width
        tok.add_tokens([f"<unused_{i}>" for i in range(pad_to - len(tok))])
        tok.save_pretrained(str(d))
    return str(d)


def _teacher(d: Path, tokenizer: str, vocab: int, hidden: int, layers: int, heads: int, ffn: int,
             seed: int = 0) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.demo_corpus import llama_config

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(vocab, hidden, layers, heads, heads, ffn, context=2048,
                                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


# ----------------------------------------------------------------------------- child (one process / rank)
def _batches_of(cfg) -> list:
    """The length-sorted batches precompute builds (world-size independent), as lists of samples."""
    from pipeline.data import SampleWindows
    from pipeline.models import load_tokenizer
    from pipeline.teacher.precompute import _batches

    tok = load_tokenizer(cfg.tokenizer or cfg.teachers[0].path)
    return [b for _, samples in SampleWindows(cfg.dataset, tok, cfg.window_rows) for b in _batches(samples, cfg.batch_size)]


def _sync(device: str) -> None:
    """Wait for the device's queued work (timing on a GPU); nothing on CPU."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _device_peak() -> dict:
    """This process's peak device memory so far in MiB (CUDA), else nothing."""
    import torch

    return {"peak_device_mib": torch.cuda.max_memory_allocated() / MIB} if torch.cuda.is_available() else {}


def bare_forward(cfg) -> dict:
    """The plain loop: from_pretrained, no FSDP, ``model(input_ids).logits`` per batch; on CUDA
    in bf16 on the device (precompute's teacher dtype there), timed to a synchronize."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data.batch import collate

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches = _batches_of(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.teachers[0].path, dtype=dtype).to(device).eval()
    with torch.no_grad():
        model(input_ids=collate(batches[0]).input_ids.to(device)).logits  # warm-up, as precompute's first call
        _sync(device)
        tokens, t0 = 0, time.perf_counter()
        for b in batches:
            model(input_ids=collate(b).input_ids.to(device), use_cache=False).logits
            tokens += sum(len(s.input_ids) for s in b)
        _sync(device)
    dt = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": dt, "tok_s": tokens / dt, **_device_peak()}


def run_precompute(cfg) -> dict:
    """``precompute-teacher``'s own function; its teacher loop's tokens/s and every rank's peak RSS."""
    from pipeline.distributed import init_distributed, teardown
    from pipeline.teacher.precompute import precompute

    info = init_distributed(cfg.device)
    try:
        stats = precompute(cfg, info).stats  # its loop ends with host copies: no queued device work
    except BaseException:
        teardown()
        raise
    return {"tokens": stats.tokens, "seconds": stats.seconds, "tok_s": stats.tokens_per_s, "peak_rss": stats.peak_rss,
            **_device_peak()}


def measure(spec: dict) -> dict:
    """One mode (``bare`` or ``precompute``) of ``spec`` in this process."""
    from pipeline.config import PrecomputeConfig

    cfg = PrecomputeConfig.model_validate(spec["config"])
    return bare_forward(cfg) if spec["mode"] == "bare" else run_precompute(cfg)


def child(spec: dict) -> None:
    from pipeline.distributed import finish

    out = measure(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["out"]).write_text(json.dumps(out))
    finish(0)  # barrier, teardown, and under torchrun the stages' exit (no finalization aborts)


def _run(spec: dict, tmp: Path, nproc: int = 1, threads: int | None = None) -> dict:
    if IN_PROCESS and nproc == 1:
        from pipeline.distributed import finish

        out = measure(spec)
        finish(0)  # the mode's one-rank process group, torn down (not a torchrun worker: returns)
        return out
    spec = {**spec, "out": str(tmp / f"out-{time.monotonic_ns()}.json")}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    me = [str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *me]
           if nproc > 1 else [sys.executable, *me])
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"child failed ({spec['mode']}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(Path(spec["out"]).read_text())


HOST_MEMORY: str | None = None  # --host-memory: precompute's host_memory in every run (default: its own default)


def _config(teacher: str, dataset: dict, cache: Path, k: int, batch_size: int, **over) -> dict:
    extra = {"host_memory": HOST_MEMORY} if HOST_MEMORY else {}
    return {"teachers": [{"path": teacher}], "dataset": dataset, "batch_size": batch_size, "device": "cpu",
            "cache": {"dir": str(cache), "k": k, "overwrite": True}, "teacher_check": "warn",  # random teachers
            **extra, **over}


# ----------------------------------------------------------------------------- sections
def section_speed(tmp: Path, corpus: str, texts, args, results: list[dict]) -> list[str]:
    """Precompute against the bare forward at each of ``args.vocabs``; one dict per V appended
    to ``results`` (medians, per-round ratios, peak device memory on CUDA)."""
    lines = []
    for V in args.vocabs:
        tok = _tokenizer(tmp / f"tok{V}", texts, min(V, 8192), pad_to=V)
        teacher = _teacher(tmp / f"teacher{V}", tok, V, args.hidden, args.layers, args.heads, args.ffn)
        dataset = {"path": corpus, "split": "train", "id_field": "id", "max_length": args.max_length,
                   "overflow": "window", "num_samples": args.samples}
        cfg = _config(teacher, dataset, tmp / f"cache{V}", args.k, args.batch_size, device=args.device)
        rounds = args.rounds
        runs = {"bare": [], "precompute": []}
        for r in range(rounds):
            for mode in (("bare", "precompute") if r % 2 == 0 else ("precompute", "bare")):
                runs[mode].append(_run({"mode": mode, "config": cfg}, tmp))
                print(f"[speed V={V}] round {r}: {mode} {runs[mode][-1]['tok_s']:,.0f} tok/s "
                      f"({runs[mode][-1]['tokens']} tokens)", flush=True)
        bare = statistics.median(x["tok_s"] for x in runs["bare"])
        pre = statistics.median(x["tok_s"] for x in runs["precompute"])
        per_round = ", ".join(f"{p['tok_s'] / b['tok_s']:.2f}" for p, b in zip(runs["precompute"], runs["bare"]))
        lines.append(f"speed V={V}: precompute {pre:,.0f} tok/s, bare forward {bare:,.0f} tok/s, ratio **{pre / bare:.2f}** "
                     f"(per round: {per_round})")
        peak = {m: max((x.get("peak_device_mib", 0.0) for x in runs[m]), default=0.0) for m in runs}
        if args.device == "cuda":
            lines[-1] += f"; peak device memory precompute {peak['precompute']:,.0f} MiB, bare {peak['bare']:,.0f} MiB"
        results.append({"section": "speed", "device": args.device, "vocab": V, "precompute_tok_s": pre,
                        "bare_tok_s": bare, "ratio": pre / bare, "tokens": runs["bare"][0]["tokens"],
                        "per_round": [p["tok_s"] / b["tok_s"] for p, b in zip(runs["precompute"], runs["bare"])],
                        "peak_device_mib": peak if args.device == "cuda" else None})
        print(lines[-1], flush=True)
    return lines


def section_data(tmp: Path, corpus: str, texts) -> list[str]:
    """Peak RSS at ≈ 1 M and ≈ 4 M tokens: the corpus's train split repeated (IDs ``{id}@{copy}``)
    until it holds 4 M tokens, its first rows for 1 M."""
    import datasets

    tok = _tokenizer(tmp / "tok2048", texts, 2048)
    teacher = _teacher(tmp / "tiny", tok, 2048, 32, 2, 4, 64)
    from transformers import AutoTokenizer

    base = datasets.load_from_disk(corpus)["train"]
    t = AutoTokenizer.from_pretrained(tok)
    per_row = sum(len(x) for x in t(base.select(range(500))["text"][:])["input_ids"]) / 500
    copies = int(4_200_000 / (per_row * len(base))) + 1
    ds = datasets.concatenate_datasets([base.map(lambda r, c=c: {"id": f"{r['id']}@{c}"}) for c in range(copies)])
    corpus = str(tmp / "corpus-4m")
    ds.save_to_disk(corpus)
    out = {}
    for target in (1_000_000, 4_000_000):
        n = min(len(ds), int(target / per_row))
        dataset = {"path": corpus, "id_field": "id", "max_length": 512, "overflow": "window", "num_samples": n}
        out[target] = _run({"mode": "precompute", "config": _config(teacher, dataset, tmp / "cache-data", 8, 16)}, tmp)
        print(f"[data] {n} rows, {out[target]['tokens']:,} tokens: peak RSS {out[target]['peak_rss'][0] / MIB:,.0f} MiB",
              flush=True)
    a, b = out[1_000_000], out[4_000_000]
    growth = (b["peak_rss"][0] - a["peak_rss"][0]) / 1e6
    return [f"data: peak RSS {a['peak_rss'][0] / MIB:,.0f} MiB at {a['tokens']:,} tokens, {b['peak_rss'][0] / MIB:,.0f} MiB "
            f"at {b['tokens']:,} tokens: growth **{growth:,.0f} MB** (goal ≤ 100 MB)"]


def section_teacher(tmp: Path, realdata: Path) -> list[str]:
    small = str(realdata / "teacher-stories260K")
    big = _teacher(tmp / "teacher155m", small, 32000, 768, 21, 12, 2048)
    nbytes = (Path(big) / "model.safetensors").stat().st_size  # fp32 parameters (+ a header of a few KB)
    dataset = {"path": str(realdata / "tinystories" / "train_head.txt"), "sample_by": "paragraph", "max_length": 128,
               "num_samples": 64}
    peaks = {}
    for name, teacher in (("stories260K", small), ("155M", big)):
        for nproc in (1, 2):
            res = _run({"mode": "precompute", "config": _config(teacher, dataset, tmp / "cache-t", 32, 16)}, tmp,
                       nproc=nproc, threads=1)
            peaks[name, nproc] = max(res["peak_rss"])
            print(f"[teacher] {name} at {nproc} rank(s): peak RSS per rank "
                  f"{', '.join(f'{m / MIB:,.0f}' for m in res['peak_rss'])} MiB", flush=True)
    lines = [f"teacher: 155M-parameter teacher, {nbytes / MIB:,.0f} MiB of fp32 parameters"]
    for nproc in (1, 2):
        bound = peaks["stories260K", nproc] + 0.6 * nbytes
        lines.append(f"teacher at {nproc} rank(s): peak RSS per rank {peaks['155M', nproc] / MIB:,.0f} MiB; stories260K "
                     f"{peaks['stories260K', nproc] / MIB:,.0f} MiB; stories260K + 0.6 x teacher = {bound / MIB:,.0f} MiB; "
                     f"excess over stories260K = **{(peaks['155M', nproc] - peaks['stories260K', nproc]) / nbytes:.2f} x** "
                     "the teacher's bytes (goal at 2 ranks ≤ 0.6)")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--realdata", help="directory with teacher-stories260K/ and tinystories/ (section teacher)")
    ap.add_argument("--only", nargs="+", choices=("speed", "data", "teacher"), default=("speed", "data", "teacher"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=48, help="rows of the corpus in the speed section")
    ap.add_argument("--host-memory", choices=("auto", "release", "reuse"), help="precompute's host_memory")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the speed section's teachers run (cuda: bf16, as precompute-teacher there)")
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32000, 512], help="teacher vocabularies of the speed section")
    ap.add_argument("--hidden", type=int, default=512, help="speed teacher: hidden size")
    ap.add_argument("--layers", type=int, default=6, help="speed teacher: decoder layers")
    ap.add_argument("--heads", type=int, default=8, help="speed teacher: attention heads")
    ap.add_argument("--ffn", type=int, default=1376, help="speed teacher: MLP width")
    ap.add_argument("--max-length", type=int, default=512, help="speed: tokens per window (overflow: window)")
    ap.add_argument("--batch-size", type=int, default=8, help="speed: sequences per teacher call")
    ap.add_argument("--k", type=int, default=64, help="speed: top-k kept per position")
    ap.add_argument("--corpus-files", type=int, default=None,
                    help="standard-library files in the corpus (default: all; a few for a smoke test)")
    ap.add_argument("--json", type=Path, default=None, help="also write the speed results here (a JSON list)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every one-rank mode in this process (smoke tests; peak RSS is then shared)")
    args = ap.parse_args(argv)
    global HOST_MEMORY, IN_PROCESS
    HOST_MEMORY, IN_PROCESS = args.host_memory, args.in_process
    if args.child:
        child(json.loads(args.child))
        return
    if args.device == "cuda" and set(args.only) - {"speed"}:
        ap.error("--device cuda measures the speed section only (data and teacher measure host RSS): "
                 "add --only speed")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.data.demo_corpus import build_corpus

    lines = [f"precompute_bench: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, sections {list(args.only)}"
             f", device {args.device}"]
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="precompute-bench-") as tmp:
        tmp = Path(tmp)
        # with a few files, half held out: a split with no rows cannot be saved and loaded back
        held = 0.05 if args.corpus_files is None else 0.5
        dd = build_corpus(tmp / "corpus", max_chars=2500, heldout_fraction=held, limit_files=args.corpus_files)
        texts = dd["train"]["text"][:4000]
        if "speed" in args.only:
            lines += section_speed(tmp, str(tmp / "corpus"), texts, args, results)
        if "data" in args.only:
            lines += section_data(tmp, str(tmp / "corpus"), texts)
        if "teacher" in args.only:
            if args.realdata and (Path(args.realdata) / "teacher-stories260K").is_dir():
                lines += section_teacher(tmp, Path(args.realdata))
            else:
                lines.append("teacher: skipped (needs --realdata with teacher-stories260K/)")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
