"""Tiny random configs of the common causal-LM architectures (tests/test_architectures.py), their
saved directories, and the float64 references computed from a model's own ``forward().logits``.

Every model: hidden 32, 2 layers, 4 heads (2 key/value heads where the architecture has them),
the fixture tokenizer's vocabulary. Settings that change the logits are set away from their
defaults where the architecture has them (Granite's multipliers, Cohere's ``logit_scale``), so
the test sees them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, pad_token_id=None, bos_token_id=0, eos_token_id=1, use_cache=False)
_GQA = dict(_COMMON, num_key_value_heads=2)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)

ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", _GQA),
    "mistral": ("MistralConfig", _GQA),
    "qwen2": ("Qwen2Config", _GQA),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_GQA, **_MOE, num_experts=4, shared_expert_intermediate_size=16)),
    "qwen3": ("Qwen3Config", dict(_GQA, head_dim=8)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_GQA, **_MOE, num_experts=3, head_dim=8)),  # 2 ranks: 2 + 1 experts
    "phi3": ("Phi3Config", _GQA),
    "gemma": ("GemmaConfig", dict(_GQA, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(_GQA, head_dim=8)),  # final_logit_softcapping 30 (its default)
    "gemma3_text": ("Gemma3TextConfig", dict(_GQA, head_dim=8)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1,
                                use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),  # no dropout:
    # a training step's CE is then the model's own (the others' dropout defaults are 0)
    "gpt_neox": ("GPTNeoXConfig", _COMMON),
    "olmo2": ("Olmo2Config", _GQA),
    "granite": ("GraniteConfig", dict(_GQA, logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.3)),
    "cohere": ("CohereConfig", dict(_GQA, logit_scale=0.25)),
    "stablelm": ("StableLmConfig", _GQA),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bos_token_id=0,
                                    eos_token_id=1, use_cache=False)),
}
"""Architecture → (transformers config class, its tiny settings)."""

SOFT_CAPPED = {"gemma2"}
"""Architectures whose logits are soft-capped (``final_logit_softcapping``)."""


def present() -> list[str]:
    """The architectures of :data:`ARCHS` the installed transformers has."""
    import transformers

    return [a for a, (cls, _) in ARCHS.items() if hasattr(transformers, cls)]


def tiny_config(arch: str, vocab: int, tie: bool):
    """The tiny config of ``arch`` with vocabulary ``vocab``, output layer tied to the input
    embedding or not."""
    import transformers

    cls, kwargs = ARCHS[arch]
    return getattr(transformers, cls)(vocab_size=vocab, tie_word_embeddings=tie, **kwargs)


def save_model(arch: str, vocab: int, tie: bool, out: Path, seed: int = 0) -> None:
    """A random model of ``arch`` saved with ``save_pretrained`` twice: ``out/one`` (one
    ``model.safetensors``) and ``out/multi`` (several files and an index; 24 kB shards). No
    tokenizer is saved with it (``AutoTokenizer`` would pick the architecture's tokenizer class,
    which may add tokens): the stages are given the fixture tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, tie))
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie, arch
    model.save_pretrained(out / "one", max_shard_size="1GB")
    model.save_pretrained(out / "multi", max_shard_size="24KB")
    assert len(list((out / "multi").glob("*.safetensors"))) > 1 and len(list((out / "one").glob("*.safetensors"))) == 1


def logprobs64(model, input_ids: np.ndarray) -> np.ndarray:
    """``log_softmax`` in float64 of ``model``'s own ``forward().logits`` for one sequence:
    (T, V) float64 (the model is converted to float64 in place)."""
    model.double().eval()
    if any(name.endswith(".experts") for name, _ in model.named_modules()):
        model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(input_ids, dtype=torch.long)[None], use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def ce_sum64(model, input_ids: np.ndarray, loss_mask: np.ndarray) -> tuple[float, int]:
    """The model's own cross-entropy of one sample, float64: ``Σ −log p(x_{t+1} | x_≤t)`` over the
    valid positions (``loss_mask[t + 1]``), and their number."""
    lp = logprobs64(model, input_ids)[:-1]  # (T-1, V): position t predicts token t+1
    valid = np.asarray(loss_mask[1:], dtype=bool)
    nll = -lp[np.arange(len(lp)), np.asarray(input_ids[1:], dtype=np.int64)]
    return float(nll[valid].sum()), int(valid.sum())


def zero_output_layer(src: Path | str, dst: Path) -> Path:
    """A copy of the model directory ``src`` with an untied output layer of zeros (a broken
    checkpoint: every logit equal); returns ``dst``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.tie_word_embeddings = False
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.zeros_like(head.weight))
    model.save_pretrained(dst)
    return dst
