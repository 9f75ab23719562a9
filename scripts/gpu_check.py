"""Both stages, the fused loss and the two benchmarks on one device, in one call: a summary
table on stdout and the same rows as JSON.

    python scripts/gpu_check.py --device cuda --out gpu_check.json   # one GPU: 4-5 minutes (estimated)
    python scripts/gpu_check.py --device cpu --out cpu_check.json    # small sizes (the test suite)

Run from the repository root of a clone with the project installed (``make install``, or
``pip install -e .`` into an environment whose torch is a CUDA build). Nothing is downloaded:
every model is a tiny Llama made from a config, every text the interpreter's standard library.
Exit code 0 when every check passed, 1 when one failed (rows marked FAIL).

Sections, in order (each row: section, check, value, limit, status ok / FAIL / info / skip):

1. ``env``: device, torch, compute capability; ``tf32``: after the stages ran, float32
   matmuls use TF32 on an Ampere or newer GPU (``pipeline.distributed.allow_tf32``), and
   nothing changed on CPU.
2. ``cache`` and ``step1`` (scripts/gpu_check_stages.py): ``precompute-teacher`` and
   ``train-student`` end to end at world size 1 with ``device`` and ``mixed_precision: bf16``
   (``--mixed-precision``): the cache against the teacher's own float32 log-softmax, the
   first step's logged loss against a float32 reference from the student's initial weights,
   with tolerances set by the compute dtype (that module's docstring says why).
3. ``loader``: during train-student every micro-batch (train and eval) was moved to the
   device once (``Batch.to`` calls = the micro-batches run, none on a batch already moved),
   pinned by the loader thread first on CUDA and never on CPU.
4. ``fused`` (scripts/gpu_check_loss.py): the fused output loss in bf16 on the device against
   a float32 reference (loss and both gradients), and for cross entropy beside the plain
   ``F.cross_entropy`` and Liger-Kernel's fused linear cross entropy where ``liger-kernel``
   imports (skipped with the reason otherwise): errors, milliseconds, peak device memory.
5. ``student_step`` and ``precompute`` (bench/student_step.py ``--only fixed``,
   bench/precompute_bench.py ``--only speed``): tokens/s of train-student's step against the
   plain PyTorch loop and of precompute against the bare teacher forward, both baselines
   measured in the same run, at V = 32,000 and V = 128,256 (CPU: V = 512, tiny models,
   in-process); ratios and peak device memory, reported (``info``), not judged.

A section that would start after ``--budget-s`` minus its reserve is skipped (row ``skip``),
so one call fits its slot; the JSON is rewritten after every section.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

SIZES = {
    "cuda": {"fused": dict(N=4096, H=2048, vocabs=[32000, 128256], reps=3),
             "student_step": ["--vocabs", "32000", "128256", "--hidden", "1024", "--layers", "8", "--heads", "16",
                              "--kv-heads", "8", "--ffn", "2816", "--batch", "8", "--seq", "1024", "--steps", "8",
                              "--warmup", "3", "--rounds", "1"],
             "precompute": ["--vocabs", "32000", "128256", "--hidden", "1024", "--layers", "8", "--heads", "16",
                            "--ffn", "2816", "--max-length", "1024", "--batch-size", "16", "--k", "64",
                            "--samples", "1024", "--rounds", "1"]},
    "cpu": {"fused": dict(N=256, H=64, vocabs=[512], reps=2),
            "student_step": ["--vocabs", "512", "--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1",
                             "--ffn", "64", "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1",
                             "--rounds", "1", "--in-process"],
            "precompute": ["--vocabs", "512", "--hidden", "32", "--layers", "2", "--heads", "2", "--ffn", "64",
                           "--max-length", "64", "--batch-size", "4", "--k", "8", "--samples", "8",
                           "--corpus-files", "12", "--rounds", "1", "--in-process"]},
}
"""Per device: the fused-loss sizes and the two benchmarks' size arguments."""
RESERVE_S = {"fused": 60, "student_step": 150, "precompute": 150}
"""Seconds a section may need (on an H100, estimated): it is skipped when fewer are left."""


class Report:
    """The summary rows, printed as a table and written as JSON after every section."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.rows = out, meta, []

    def add(self, section: str, check: str, value, limit="", status: str = "info", note: str = "") -> None:
        """One row; ``status`` ok / FAIL / info / skip; ``value`` a number, bool or text."""
        self.rows.append({"section": section, "check": check, "value": value, "limit": limit, "status": status,
                          "note": note})

    def judge(self, section: str, check: str, value: float, limit: float, ok: bool, note: str = "") -> None:
        self.add(section, check, value, limit, "ok" if ok else "FAIL", note)

    @property
    def failed(self) -> bool:
        return any(r["status"] == "FAIL" for r in self.rows)

    def write(self) -> None:
        self.out.write_text(json.dumps({**self.meta, "ok": not self.failed, "rows": self.rows}, indent=1, default=str))

    def table(self) -> str:
        fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
        cells = [[r["section"], r["check"], fmt(r["value"]), fmt(r["limit"]), r["status"], r["note"]] for r in self.rows]
        head = ["section", "check", "value", "limit", "status", "note"]
        w = [max(len(c[i]) for c in cells + [head]) for i in range(5)]
        line = lambda c: "  ".join(x.ljust(w[i]) for i, x in enumerate(c[:5])) + (f"  {c[5]}" if c[5] else "")  # noqa: E731
        return "\n".join([line(head), line(["-" * n for n in w] + [""])] + [line(c) for c in cells])


def _bench(name: str):
    """bench/<name>.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def env_rows(rep: Report, device: torch.device) -> None:
    rep.add("env", "device", torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or "cpu")
    rep.add("env", "torch", torch.__version__)
    if device.type == "cuda":
        rep.add("env", "compute capability", ".".join(map(str, torch.cuda.get_device_capability(device))))


def tf32_row(rep: Report, device: torch.device, before: str) -> None:
    """TF32 allowed for float32 matmuls after the stages ran: on Ampere+ only, never on CPU."""
    m = torch.backends.cuda.matmul
    now = m.fp32_precision if hasattr(m, "fp32_precision") else ("tf32" if m.allow_tf32 else "ieee")
    ampere = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    want = "tf32" if ampere else before
    rep.judge("tf32", "float32 matmul precision after the stages", now, want, now == want,
              "Ampere or newer: TF32" if device.type == "cuda" else "CPU: unchanged")


def stages_section(rep: Report, work: Path, device: torch.device, mixed_precision: str) -> None:
    import gpu_check_stages as st
    from pipeline.distributed import compute_dtype

    m = torch.backends.cuda.matmul
    before = m.fp32_precision if hasattr(m, "fp32_precision") else ("tf32" if m.allow_tf32 else "ieee")
    a = st.build(work / "e2e")
    out = st.run_stages(a, work / "e2e", device.type, mixed_precision)
    tf32_row(rep, device, before)
    t_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # precompute-teacher's rule
    c = st.check_cache(a, out["cache"])
    tol = st.tolerance(t_dtype, c["zmax"])
    note = f"teacher in {str(t_dtype).split('.')[-1]}, max|z| {c['zmax']:.2f}, {c['positions']} positions, k={st.K}"
    rep.judge("cache", "max |cached - float32 log-softmax| (nats)", c["value_err"], tol, c["value_err"] <= tol, note)
    rep.judge("cache", "min margin of cached ids over the top-k", c["id_margin"], -tol, c["id_margin"] >= -tol)
    rep.add("cache", "positions with the exact top-k id set", c["topk_exact"])
    rep.judge("cache", "max |tail mass - float32 tail mass|", c["tail_err"], tol, c["tail_err"] <= tol)
    s_dtype = compute_dtype(mixed_precision, device) or torch.float32
    s = st.check_step1(a, out["cache"], out["run"])
    tol = st.tolerance(s_dtype, s["zmax"])
    note = f"student in {str(s_dtype).split('.')[-1]}, max|z| {s['zmax']:.2f}, {s['samples']} samples"
    rep.judge("step1", "|train/loss - float32| (nats/token)", s["loss_err"], tol, s["loss_err"] <= tol,
              f"{note}; logged {s['loss']:.5f}, float32 {s['ref_loss']:.5f}")
    rep.judge("step1", "max per-sample |ce_sum - float32| / n_tokens", s["ce_err"], tol, s["ce_err"] <= tol)
    rep.judge("step1", "max per-sample |kl_sum - float32| / n_tokens", s["kl_err"], tol, s["kl_err"] <= tol)
    rep.judge("step1", "n_tokens equal the valid positions", s["tokens_equal"], True, s["tokens_equal"])
    mv, want = out["moves"], out["expected_moves"]
    rep.judge("loader", "Batch.to calls (once per micro-batch)", mv["moved"], want,
              mv["moved"] == want and mv["again"] == 0, f"{mv['again']} on batches already moved")
    pinned_want = mv["moved"] if device.type == "cuda" else 0
    rep.judge("loader", "batches pinned before the copy", mv["pinned"], pinned_want, mv["pinned"] == pinned_want,
              "CUDA: pinned in the loader thread" if device.type == "cuda" else "CPU: never pinned")


def fused_section(rep: Report, device: torch.device) -> None:
    import gpu_check_loss as fl

    for r in fl.run(device, **SIZES[device.type]["fused"]):
        what = f"{r['case']} V={r['vocab']} {r['impl']}"
        if "skipped" in r:
            rep.add("fused", what, "", "", "skip", r["skipped"])
            continue
        perf = f"{r['ms']:.1f} ms" + (f", {r['peak_mib']:,.0f} MiB" if r["peak_mib"] is not None else "")
        note = f"N={r['N']} H={r['H']} bf16; {perf}"
        if r["impl"] == "ours":
            rep.judge("fused", f"{what}: loss rel err", r["loss_rel_err"], fl.LOSS_TOL, r["loss_rel_err"] <= fl.LOSS_TOL, note)
            g = max(r["grad_h_rel_err"], r["grad_w_rel_err"])
            rep.judge("fused", f"{what}: grad rel err (h, W)", g, fl.GRAD_TOL, g <= fl.GRAD_TOL)
        else:
            g = max(r["grad_h_rel_err"], r["grad_w_rel_err"])
            rep.add("fused", f"{what}: loss / grad rel err", f"{r['loss_rel_err']:.2e} / {g:.2e}", "", "info", note)


def bench_section(rep: Report, name: str, device: torch.device, work: Path) -> None:
    """One benchmark (``student_step`` or ``precompute``) with the device's size arguments."""
    out = work / f"{name}.json"
    if name == "student_step":
        _bench("student_step").main(["--device", device.type, "--only", "fixed", "--json", str(out),
                                      *SIZES[device.type]["student_step"]])
        for r in json.loads(out.read_text()):
            mem = f", peak {r['peak_mib']:,.0f} MiB ({'device' if 'device' in r['memory'] else 'RSS'})"
            rep.add("student_step", f"V={r['vocab']} {r['mode']}", r["tok_s"], "", "info",
                    f"{r['ratio_to_plain']:.2f}x plain{mem}")
    else:
        _bench("precompute_bench").main(["--device", device.type, "--only", "speed", "--json", str(out),
                                          *SIZES[device.type]["precompute"]])
        for r in json.loads(out.read_text()):
            mem = r.get("peak_device_mib")
            mem = f"; peak MiB precompute {mem['precompute']:,.0f}, bare {mem['bare']:,.0f}" if mem else ""
            rep.add("precompute", f"V={r['vocab']} precompute / bare forward", r["ratio"], "", "info",
                    f"{r['precompute_tok_s']:,.0f} vs {r['bare_tok_s']:,.0f} tok/s{mem}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--mixed-precision", choices=("bf16", "no"), default="bf16",
                    help="train-student's mixed_precision (bf16: FSDP2 at one rank with a bf16 policy)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the summary as JSON")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one, kept)")
    ap.add_argument("--budget-s", type=float, default=480, help="skip sections that would end after this")
    ap.add_argument("--skip", nargs="*", default=[], choices=("stages", "fused", "student_step", "precompute"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False (a CPU build of torch, or no GPU)")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.monotonic()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    work = args.work or Path(tempfile.mkdtemp(prefix=f"gpu-check-{args.device}-"))
    work.mkdir(parents=True, exist_ok=True)
    rep = Report(args.out, {"device": args.device, "mixed_precision": args.mixed_precision, "work": str(work)})
    env_rows(rep, device)
    sections = [("stages", lambda: stages_section(rep, work, device, args.mixed_precision)),
                ("fused", lambda: fused_section(rep, device)),
                ("student_step", lambda: bench_section(rep, "student_step", device, work)),
                ("precompute", lambda: bench_section(rep, "precompute", device, work))]
    for name, fn in sections:
        left = args.budget_s - (time.monotonic() - t0)
        if name in args.skip or left < RESERVE_S.get(name, 0):
            rep.add(name, "section", "", "", "skip", "--skip" if name in args.skip else f"{left:.0f} s left of the budget")
            continue
        s0 = time.monotonic()
        try:
            fn()
        except (Exception, SystemExit) as e:  # noqa: BLE001 — a FAIL row (a bench's sys.exit too); the rest runs
            (work / f"{name}.error.txt").write_text(traceback.format_exc())
            rep.add(name, "section", f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}", "",
                    "FAIL", f"traceback in {work / (name + '.error.txt')}")
        rep.add(name, "seconds", round(time.monotonic() - s0, 1))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rep.write()
    rep.meta["seconds"] = round(time.monotonic() - t0, 1)
    rep.write()
    print(rep.table())
    print(f"{'FAILED' if rep.failed else 'all checks passed'} in {rep.meta['seconds']} s; "
          f"JSON: {args.out}; work directory: {work}")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
