"""Generation of completions for sequence-level (a teacher's samples) and on-policy (a student's
samples) distillation: ``generate-completions``. Shared by no stage package: its output is a
dataset (:mod:`pipeline.data.generated`) that stage 1 reads as is.

Layout:

- :mod:`pipeline.generation.prompts`: prompt rows → :class:`Prompt` (chat cut before the last
  assistant message, prompt/response prompts, the first tokens of text rows).
- :mod:`pipeline.generation.sampling`: seeded, batch-invariant token-by-token sampling with the
  KV cache (:func:`sample_completions`, :func:`completion_seed`).
- :mod:`pipeline.generation.output`: the manifest, atomic shards, resume and finalisation.
- :mod:`pipeline.generation.run`: the stage's loop (:func:`generate`).
"""
from pipeline.generation.prompts import Prompt, make_prompts
from pipeline.generation.run import GenerateResult, generate
from pipeline.generation.sampling import completion_seed, draw_tokens, next_token_probs, sample_completions

__all__ = ["GenerateResult", "Prompt", "completion_seed", "draw_tokens", "generate", "make_prompts",
           "next_token_probs", "sample_completions"]
