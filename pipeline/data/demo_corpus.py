"""The embedded default corpus: the running interpreter's Python standard library source.

Real text nobody on the team wrote, present on every machine that has Python: the ``.py``
files of ``sysconfig.get_paths()["stdlib"]`` (tests, site-packages and vendored test data
excluded), cut into chunks of whole lines. Also: the demo's byte-level BPE tokenizer and
tiny Llama configs, so the demo and the tests need no network.

Sample IDs are ``"{relative path}:{chunk index}"`` (stable for a given Python version);
whole files go to the held-out split by a hash of their path (no file leaks across splits).
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

# encodings/ and pydoc_data/ are generated tables (near-duplicate codec maps, a 750 KB dump of
# the docs): they would inflate held-out scores, so they are left out.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo",
             "encodings", "pydoc_data"}


def stdlib_files(limit: int | None = None) -> list[tuple[str, Path]]:
    """(relative path, absolute path) of the standard library's source files, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith(".py"):
                p = Path(dirpath) / f
                out.append((str(p.relative_to(root)), p))
    out.sort()
    return out[:limit] if limit else out


def chunk_lines(text: str, max_chars: int) -> list[str]:
    """Split text into chunks of whole lines of at most ``max_chars`` (a longer line is cut)."""
    chunks, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        line = line[:max_chars]
        if size + len(line) > max_chars and cur:
            chunks.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        chunks.append("".join(cur))
    return [c for c in chunks if c.strip()]


def _heldout(relpath: str, fraction: float) -> bool:
    return int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def build_corpus(out_dir: str | os.PathLike, max_chars: int = 1000, heldout_fraction: float = 0.05,
                 limit_files: int | None = None, seed: int = 0):
    """Build and ``save_to_disk`` a ``DatasetDict`` with ``train`` and ``validation`` splits.

    Columns: ``id`` (str), ``text`` (str), ``path`` (str). Train rows are shuffled with
    ``seed`` so that the first N rows are a random subset of all files.

    Returns:
        the ``datasets.DatasetDict``.
    """
    import datasets

    rows = {"train": [], "validation": []}
    for rel, path in stdlib_files(limit_files):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        split = "validation" if _heldout(rel, heldout_fraction) else "train"
        rows[split].extend({"id": f"{rel}:{i}", "text": c, "path": rel} for i, c in enumerate(chunk_lines(text, max_chars)))
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})
    dd["train"] = dd["train"].shuffle(seed=seed).flatten_indices()
    dd.save_to_disk(str(out_dir))
    return dd


def train_tokenizer(texts, vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE tokenizer (Hugging Face ``tokenizers``) that prepends ``<|bos|>``,
    and save it as a ``PreTrainedTokenizerFast`` directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.save_pretrained(str(out_dir))
    return fast


def llama_config(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int | None = None,
                 ffn: int | None = None, context: int = 512, bos_token_id: int = 0, eos_token_id: int = 1):
    """A small ``LlamaConfig`` with tied embeddings (parameter count ≈ V·h + layers·(4h² + 3h·ffn))."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads or heads, intermediate_size=ffn or 4 * hidden,
                       max_position_embeddings=context, tie_word_embeddings=True, bos_token_id=bos_token_id,
                       eos_token_id=eos_token_id, pad_token_id=None, use_cache=False)


if __name__ == "__main__":  # python -m pipeline.data.demo_corpus OUT_DIR
    dd = build_corpus(sys.argv[1] if len(sys.argv) > 1 else "data/build/stdlib")
    print({k: len(v) for k, v in dd.items()})
