"""Write a generated dataset (docs/guide/generation.md) with vLLM instead of generate-completions.

UNTESTED example: written without a GPU or vLLM at hand. It produces the same columns and manifest
keys, so ``precompute-teacher`` reads its output as is; its rows are not the bits
generate-completions writes (vLLM's sampler and kernels differ), and a rerun resumes nothing
(it writes one shard at the end).

    python scripts/vllm_generate.py --config gen.yaml

Reads the same YAML as ``generate-completions`` (``model``, ``dataset``, ``prompt_tokens``,
``output_dir``, ``sampling``; ``stop_token_ids`` added to vLLM's stop tokens).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
except ImportError:  # the import guard: the script needs vLLM, nothing else in the project does
    LLM = SamplingParams = TokensPrompt = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a generate-completions YAML config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = p.parse_args(argv)
    if LLM is None:
        print("vllm_generate.py: error: vLLM is not installed (pip install vllm)", file=sys.stderr)
        return 2

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import GenerateConfig, load_config
    from pipeline.data import load_rows
    from pipeline.data.generated import FORMAT, FORMAT_VERSION, MANIFEST, arrow_schema
    from pipeline.generation import completion_seed, make_prompts
    from pipeline.models import load_tokenizer, model_fingerprint, tokenizer_fingerprint
    from pipeline.storage import Folder

    cfg = load_config(GenerateConfig, args.config, args.overrides)
    s = cfg.sampling
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    ds = load_rows(cfg.dataset)
    prompts, skipped = make_prompts(ds, tokenizer, cfg.dataset, cfg.prompt_tokens, 0, ds._fingerprint)
    stops = sorted(set(s.stop_token_ids) | ({tokenizer.eos_token_id} - {None}))
    # one seed per prompt (vLLM seeds a request's generator; its n completions draw from it in turn),
    # so prompts do not share one random stream
    params = [SamplingParams(n=s.num_completions, max_tokens=s.max_new_tokens, temperature=s.temperature,
                             top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1,
                             seed=completion_seed(s.seed, p.prompt_id, 0), stop_token_ids=stops,
                             skip_special_tokens=False) for p in prompts]
    llm = LLM(model=cfg.model, tokenizer=cfg.tokenizer or cfg.model)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p.ids.tolist()) for p in prompts], params)
    rows = []
    for p, out in zip(prompts, outputs):
        for j, c in enumerate(out.outputs):
            ids = list(c.token_ids)
            reason = "eos" if ids and ids[-1] in stops else "length"
            rows.append({"id": f"{p.prompt_id}/{j}", "prompt_id": p.prompt_id, "prompt_ids": p.ids.tolist(),
                         "completion_ids": ids, "prompt": p.text, "completion": c.text, "finish_reason": reason})
    folder, name = Folder(cfg.output_dir), "part-r00000-a000-00000.parquet"
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema()), buf, compression="zstd")
    folder.write_bytes(name, buf.getvalue())
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "generator": "vllm",
                "model": {"path": str(Path(cfg.model).resolve()), "fingerprint": model_fingerprint(cfg.model)},
                "model_fingerprint": model_fingerprint(cfg.model), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "vocab_size": len(tokenizer), "sampling": s.model_dump(), "prompt_tokens": cfg.prompt_tokens,
                "dataset": cfg.dataset.model_dump(), "num_rows": len(rows), "num_prompts": len(prompts),
                "skipped_prompts": skipped, "num_source_rows": len(ds),
                "finish_reasons": {r: sum(x["finish_reason"] == r for x in rows) for r in ("eos", "length")},
                "shards": [{"file": name, "rows": len(rows)}], "complete": True}
    folder.write_bytes(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())  # last: the commit point
    print(f"wrote {len(rows)} rows of {len(prompts)} prompts to {cfg.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
