"""Bits per byte of a causal LM (with its own tokenizer) on held-out text: a measure that compares
models with different tokenizers, where perplexities per token do not.

    bits/byte = Σ_paragraphs Σ_t −log p(x_t | x_<t)  /  (ln 2 · Σ_paragraphs UTF-8 bytes)

over every token after the first (BOS when the tokenizer adds one; a tokenizer without BOS
loses the first token's prediction, which is counted nowhere, a small bias against it), of the
paragraphs ``skip .. skip + n`` of a text file (paragraphs separated by blank lines), each
truncated to ``--max-length`` tokens (the bytes counted are those of the kept tokens' text).

Run::

    .venv/bin/python bench/bits_per_byte.py MODEL_DIR TEXT_FILE [--skip 600] [--n 1000]

Prints one JSON line: ``{"model", "bits_per_byte", "nats", "bytes", "tokens", "paragraphs"}``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def paragraphs(path: str, skip: int, n: int) -> list[str]:
    """Paragraphs ``skip .. skip + n`` of a text file (blank-line separated, stripped, non-empty)."""
    paras = [p.strip() for p in Path(path).read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return paras[skip: skip + n]


def bits_per_byte(model_dir: str, texts: list[str], max_length: int = 512, batch: int = 16) -> dict:
    """Summed next-token NLL of ``texts`` under the model, per UTF-8 byte, in bits.

    Returns:
        ``{"bits_per_byte", "nats", "bytes", "tokens", "paragraphs"}``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nats, n_bytes, n_tok = 0.0, 0, 0
    for i in range(0, len(texts), batch):
        enc = tok(texts[i: i + batch], add_special_tokens=True, truncation=True, max_length=max_length,
                  return_offsets_mapping=True)
        for ids, offs, text in zip(enc["input_ids"], enc["offset_mapping"], texts[i: i + batch]):
            x = torch.tensor([ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            nats -= float(logp.gather(1, x[0, 1:, None]).sum())
            end = max(e for _, e in offs) if offs else 0
            n_bytes += len(text[:end].encode("utf-8"))
            n_tok += len(ids) - 1
    return {"bits_per_byte": nats / (math.log(2) * max(n_bytes, 1)), "nats": nats, "bytes": n_bytes, "tokens": n_tok,
            "paragraphs": len(texts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("text_file")
    ap.add_argument("--skip", type=int, default=0, help="paragraphs to skip first")
    ap.add_argument("--n", type=int, default=1000, help="paragraphs to score")
    ap.add_argument("--max-length", type=int, default=512)
    a = ap.parse_args(argv)
    res = bits_per_byte(a.model_dir, paragraphs(a.text_file, a.skip, a.n), a.max_length)
    print(json.dumps({"model": a.model_dir, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
