"""The causal-LM families whose forward :mod:`~unlearn_kernels.patching` reproduces.

Each listed family computes ``logits = lm_head(decoder(x))``, softcapped
``c·tanh(z/c)`` when its config sets ``final_logit_softcapping`` (Gemma-2/3), and its
``labels=`` loss is the shifted mean cross-entropy of ``transformers``' ``ForCausalLMLoss``. A
family that transforms the logits further (Cohere's ``logit_scale``, Granite's
``logits_scaling``) or routes them through something else (vision towers, MoE router losses)
is not listed: patching it is a ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One supported ``config.model_type``: a display name, the ``transformers`` causal-LM
    class, and whether its config may carry a final logit softcap."""

    name: str
    causal_lm: str
    softcap: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family("Llama", "LlamaForCausalLM"),
    "mistral": Family("Mistral", "MistralForCausalLM"),
    "qwen2": Family("Qwen2", "Qwen2ForCausalLM"),
    "qwen3": Family("Qwen3", "Qwen3ForCausalLM"),
    "phi3": Family("Phi-3", "Phi3ForCausalLM"),
    "gemma2": Family("Gemma-2", "Gemma2ForCausalLM", softcap=True),
    "gemma3_text": Family("Gemma-3", "Gemma3ForCausalLM", softcap=True),
}


def family_of(model_type: str, what: str) -> Family:
    """The family of ``model_type``; a ``ValueError`` naming ``what`` and the supported ones."""
    if model_type not in FAMILIES:
        supported = ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())
        raise ValueError(
            f"{what} has model_type {model_type!r}, which unlearn_kernels.patch does not support; "
            f"supported: {supported}. For another architecture use "
            "unlearn_kernels.hf.causal_lm_loss after checking it with check_output_head"
        )
    return FAMILIES[model_type]
