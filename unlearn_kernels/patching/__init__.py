"""Make a Hugging Face causal LM's own ``labels=`` loss the fused one, in one line.

``handle = unlearn_kernels.patch(model)`` replaces ``forward`` on this model only (a PEFT model's
transformers model inside it; other instances and the class are untouched), so that::

    out = model(input_ids, attention_mask, labels=labels, token_weight=weights)

returns ``out.loss`` from :func:`~unlearn_kernels.fused_linear_cross_entropy` and
``out.logits is None`` (see :mod:`.forward` for the loss, ``token_weight`` and
``num_items_in_batch``). ``handle.undo()``, or leaving ``with unlearn_kernels.patch(model):``,
restores the previous forward. ``patch("llama")`` (a ``model_type``) or ``patch(cls)`` patches
the class instead, for models built later. Supported families: :data:`.families.FAMILIES`.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

from torch import nn

from unlearn_kernels._deps import require
from unlearn_kernels.hf import output_head, unwrap_model
from unlearn_kernels.patching.families import FAMILIES, Family, family_of
from unlearn_kernels.patching.forward import make_forward

__all__ = ["FAMILIES", "Family", "PatchHandle", "patch"]

_ABSENT = object()


class PatchHandle:
    """Undoes one :func:`patch`: ``undo()`` (idempotent) or ``with`` exit."""

    def __init__(self, owner: Any, attribute: str, previous: Any) -> None:
        self.owner, self.attribute, self._previous = owner, attribute, previous
        self.active = True

    def undo(self) -> None:
        """Put the previous forward back."""
        if not self.active:
            return
        if self._previous is _ABSENT:
            delattr(self.owner, self.attribute)
        else:
            setattr(self.owner, self.attribute, self._previous)
        self.active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()


def _class_for(target: str | type) -> tuple[type, Family]:
    if isinstance(target, str):
        family = family_of(target, f"patch({target!r})")
        require("transformers", purpose=f"patch({target!r})")
        import transformers

        return getattr(transformers, family.causal_lm), family
    config_class = getattr(target, "config_class", None)
    model_type = getattr(config_class, "model_type", None)
    return target, family_of(str(model_type), target.__name__)


def patch(
    model: nn.Module | str | type,
    *,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> PatchHandle:
    """Route ``model``'s ``labels=`` loss through the fused cross-entropy (module docstring).

    Args:
        model: a transformers causal LM of a supported family, plain, PEFT-wrapped or
            bitsandbytes-quantised; or a ``model_type`` / causal-LM class to patch the class.
        chunk_size, backend: passed to the fused op.

    Raises:
        ValueError: an unsupported family (naming it and the supported ones), an output layer
            the fused loss cannot use (see :func:`~unlearn_kernels.hf.output_head`), or a
            model that is already patched.
    """
    if isinstance(model, (str, type)):
        owner, family = _class_for(model)
        attribute, bound = "forward", False
    else:
        owner = unwrap_model(model)
        family = family_of(owner.config.model_type, type(owner).__name__)
        output_head(owner)  # an unusable head fails now, not at the first step
        # accelerate's device hooks keep the model's own forward in _old_forward and wrap it
        attribute = "_old_forward" if hasattr(owner, "_hf_hook") else "forward"
        bound = True
    original = getattr(owner, attribute)
    if getattr(original, "unlearn_kernels_original", None) is not None:
        raise ValueError(f"{getattr(owner, '__name__', type(owner).__name__)} is already patched")
    previous = owner.__dict__.get(attribute, _ABSENT)
    forward = make_forward(original, family, bound=bound, chunk_size=chunk_size, backend=backend)
    setattr(owner, attribute, MethodType(forward, owner) if bound else forward)
    return PatchHandle(owner, attribute, previous)
