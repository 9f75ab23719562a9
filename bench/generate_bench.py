"""``generate-completions`` against the plain batched ``model.generate`` loop a user would write,
measured in the same run; prints tokens/s of each and their ratio (goal ≥ 0.9).

The stage: :func:`pipeline.generation.generate` (seeded per-completion draws, KV cache, left
padding, shards written), its tokens/s = completion tokens it generated ÷ its loop's seconds.
The baseline: the same model loaded with ``AutoModelForCausalLM.from_pretrained``, the same
prompts (the stage's own ``prompt_ids``, in its batch order), batches of ``batch_size`` prompts ×
``num_completions`` (``num_return_sequences``), left padding, ``model.generate(do_sample=True,
temperature, top_k, top_p, max_new_tokens)`` with the stage's stop tokens; its tokens are each
row's completion up to and including its first stop token. The model: a random tied Llama on a
byte-level BPE trained on the standard-library corpus (``pipeline/data/demo_corpus.py``); modes run
alternately ``--rounds`` times and the ratio of medians is printed.

Run (from the repository root, nothing else running)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/generate_bench.py [--device cuda] [--rounds 3]
    OMP_NUM_THREADS=1 .venv/bin/python bench/generate_bench.py --tiny   # a check that it runs

Read the ratio, not the absolute numbers: the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"tiny": dict(vocab=320, hidden=32, layers=2, heads=4, prompts=6, max_new_tokens=8, batch_size=3),
         "default": dict(vocab=2048, hidden=256, layers=4, heads=8, prompts=64, max_new_tokens=64, batch_size=16)}


def build(work: Path, size: dict) -> tuple[str, str]:
    """(corpus DatasetDict dir, model dir with tokenizer) of the random tied Llama."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data.demo_corpus import build_corpus, llama_config, train_tokenizer

    dd = build_corpus(work / "corpus", max_chars=400, heldout_fraction=0.1, limit_files=40)
    tok = train_tokenizer(dd["train"]["text"][:], size["vocab"], work / "tokenizer")
    torch.manual_seed(0)
    h = size["hidden"]
    model = AutoModelForCausalLM.from_config(llama_config(len(tok), h, size["layers"], size["heads"], size["heads"],
                                                          4 * h, bos_token_id=tok.bos_token_id,
                                                          eos_token_id=tok.eos_token_id))
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    return str(work / "corpus"), str(work / "model")


def run_stage(corpus: str, model: str, out: Path, size: dict, device: str) -> tuple[float, list[list[int]]]:
    """The stage's tokens/s and its prompts (token IDs, one per prompt, in batch order)."""
    import pyarrow.parquet as pq

    from pipeline.config import GenerateConfig
    from pipeline.distributed import init_distributed
    from pipeline.generation import generate

    cfg = GenerateConfig.model_validate({
        "model": model, "output_dir": str(out), "device": device, "batch_size": size["batch_size"],
        "dataset": {"path": corpus, "id_field": "id", "num_samples": size["prompts"], "max_length": 64},
        "prompt_tokens": 16, "sampling": {"num_completions": 2, "max_new_tokens": size["max_new_tokens"],
                                          "temperature": 1.0, "top_k": 50, "top_p": 0.95}})
    res = generate(cfg, init_distributed(device))
    # shards in file order, rows in batch order: the stage's batches of the dataset's rows
    rows = [r for f in sorted(out.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    prompts: dict = {}
    for r in rows:
        prompts.setdefault(r["prompt_id"], r["prompt_ids"])
    return res.tokens / res.seconds, list(prompts.values())


def run_plain(model_dir: str, prompts: list[list[int]], size: dict, device: str) -> float:
    """Tokens/s of the plain batched ``model.generate`` loop over ``prompts``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stops = {tok.eos_token_id}
    tokens, t0 = 0, time.perf_counter()
    bs = size["batch_size"]
    with torch.no_grad():
        for a in range(0, len(prompts), bs):
            batch = prompts[a: a + bs]
            L = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in batch], device=device)
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in batch], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=50,
                                 top_p=0.95, max_new_tokens=size["max_new_tokens"], num_return_sequences=2,
                                 eos_token_id=sorted(stops), pad_token_id=pad)
            for row in out[:, L:].tolist():
                n = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                tokens += n
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model and few prompts: checks that it runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    size = SIZES["tiny" if args.tiny else "default"]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        corpus, model = build(work, size)
        stage, plain = [], []
        for i in range(args.rounds if not args.tiny else 1):
            tps, prompts = run_stage(corpus, model, work / f"gen-{i}", size, args.device)
            stage.append(tps)
            plain.append(run_plain(model, prompts, size, args.device))
            print(f"round {i}: stage {stage[-1]:.0f} tok/s, plain generate {plain[-1]:.0f} tok/s", flush=True)
    s, b = statistics.median(stage), statistics.median(plain)
    print(f"generate-completions {s:.0f} tok/s / plain model.generate {b:.0f} tok/s = {s / b:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
