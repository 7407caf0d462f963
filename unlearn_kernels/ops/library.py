"""The fused losses as ``torch.library`` custom operators, for ``torch.compile``.

While Dynamo traces (``torch.compiler.is_compiling()``), :func:`~unlearn_kernels.
fused_linear_cross_entropy`, :func:`~unlearn_kernels.fused_linear_kl` and
:func:`~unlearn_kernels.fused_linear_kl_topk` call their operator here instead of their
autograd Function. The graph then holds one opaque operator per loss, shaped by its fake
implementation: the data-dependent row selection and chunk loop stay inside it, so they cause
no graph break, and its autograd formula gives the backward graph.

Each operator is a thin wrapper over the eager function, which it runs at execution time (input
checks included) on detached copies of the differentiable inputs, with autograd dispatch
re-enabled (operators run below autograd):

- ``sum`` / ``mean``: the operator returns the loss and the gradients its forward sweep already
  computed; the backward formula multiplies them by the upstream gradient.
- ``none``: the operator returns the per-row losses; its backward operator runs the eager
  function again with the upstream gradient (a forward sweep and a recompute sweep: one sweep
  more than eager).

Operators: ``unlearn_kernels::cross_entropy``, ``::kl``, ``::kl_topk`` and their ``_backward``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unlearn_kernels.ops.chunking import accumulate_dtype


@contextmanager
def _autograd_dispatch() -> Iterator[None]:
    """Autograd inside an operator's implementation (which runs with the autograd dispatch keys
    excluded), restored on exit."""
    keys = (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView)
    excluded = [torch._C._dispatch_tls_is_dispatch_key_excluded(key) for key in keys]
    try:
        for key in keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        with torch.enable_grad():
            yield
    finally:
        for key, was in zip(keys, excluded, strict=True):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)


@dataclass(frozen=True)
class _Op:
    """One fused loss as an operator: its eager function (``module:name``, imported when first
    run), its tensor arguments in schema order (``?``: optional), which of them get gradients,
    and its other arguments with their schema types."""

    name: str
    function: str
    tensors: tuple[str, ...]
    differentiable: tuple[str, ...]
    options: tuple[tuple[str, str], ...]
    #: ``(flag, field, kind)``: with option ``flag`` the result is a structured output whose
    #: ``field`` is returned too (detached); ``kind`` is ``reduced`` (shaped like the loss),
    #: ``rows`` (one per row) or ``rows_long`` (one int64 per row)
    extras: tuple[tuple[str, str, str], ...] = ()

    def asked(self, named: dict[str, Any]) -> list[tuple[str, str, str]]:
        return [extra for extra in self.extras if named[extra[0]]]

    @property
    def argument_names(self) -> list[str]:
        return [t.rstrip("?") for t in self.tensors] + [name for name, _ in self.options]

    def schema(self, *, backward: bool) -> str:
        tensors = [f"Tensor{'?' if t.endswith('?') else ''} {t.rstrip('?')}" for t in self.tensors]
        options = [f"{kind} {name}" for name, kind in self.options]
        grad = ["Tensor grad"] if backward else []
        return f"({', '.join([*grad, *tensors, *options, 'bool[] needs'])}) -> Tensor[]"


def _run(op: _Op, args: tuple[Any, ...], needs: list[bool], grad: Tensor | None) -> list[Tensor]:
    """The eager function on ``args``: ``[loss, *gradients]`` (forward, sum/mean: the gradients
    its sweep computed; none: no gradients) or ``gradients`` (backward, with ``grad``)."""
    named = dict(zip(op.argument_names, args, strict=True))
    with _autograd_dispatch():
        leaves = []
        for name, need in zip(op.differentiable, needs, strict=True):
            if named[name] is not None:
                named[name] = named[name].detach().requires_grad_(need)
                if need:
                    leaves.append(named[name])
        module, function = op.function.split(":")
        result = getattr(importlib.import_module(module), function)(**named)
        loss = result if isinstance(result, Tensor) else result.loss
        if grad is not None:
            return list(torch.autograd.grad(loss, leaves, grad_outputs=grad)) if leaves else []
        outputs = [loss.detach(), *(getattr(result, field) for _, field, _ in op.asked(named))]
        if named["reduction"] == "none" or not leaves:
            return outputs
        return [*outputs, *torch.autograd.grad(loss, leaves)]


def _wanted(op: _Op, args: tuple[Any, ...], needs: list[bool]) -> list[Tensor]:
    named = dict(zip(op.argument_names, args, strict=True))
    tensors = [named[name] for name in op.differentiable]
    return [t for t, need in zip(tensors, needs, strict=True) if need and t is not None]


def _define(op: _Op) -> None:
    qualified = f"unlearn_kernels::{op.name}"
    torch.library.define(qualified, op.schema(backward=False))
    torch.library.define(f"{qualified}_backward", op.schema(backward=True))
    backward_op = getattr(torch.ops.unlearn_kernels, f"{op.name}_backward")

    @torch.library.impl(qualified, "CompositeExplicitAutograd")
    def forward(*args: Any) -> list[Tensor]:
        return _run(op, args[:-1], args[-1], None)

    @torch.library.register_fake(qualified)
    def forward_fake(*args: Any) -> list[Tensor]:
        named = dict(zip(op.argument_names, args[:-1], strict=True))
        hidden = named["hidden"]
        rows = hidden.shape[:-1]
        dtype = accumulate_dtype(hidden.dtype)
        loss = hidden.new_empty(rows if named["reduction"] == "none" else (), dtype=dtype)
        shapes = {"reduced": (loss.shape, dtype), "rows": (rows, dtype)}
        shapes["rows_long"] = (rows, torch.int64)
        outputs = [loss]
        for _, _, kind in op.asked(named):
            shape, kind_dtype = shapes[kind]
            outputs.append(hidden.new_empty(shape, dtype=kind_dtype))
        if named["reduction"] == "none":
            return outputs
        return [*outputs, *(torch.empty_like(t) for t in _wanted(op, args[:-1], args[-1]))]

    @torch.library.impl(f"{qualified}_backward", "CompositeExplicitAutograd")
    def backward_impl(grad: Tensor, *args: Any) -> list[Tensor]:
        return _run(op, args[:-1], args[-1], grad)

    @torch.library.register_fake(f"{qualified}_backward")
    def backward_fake(grad: Tensor, *args: Any) -> list[Tensor]:
        return [torch.empty_like(t) for t in _wanted(op, args[:-1], args[-1])]

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
        args, needs = inputs[:-1], inputs[-1]
        named = dict(zip(op.argument_names, args, strict=True))
        ctx.options = [named[name] for name, _ in op.options]
        ctx.needs = needs
        ctx.present = [
            need and named[name] is not None
            for name, need in zip(op.differentiable, needs, strict=True)
        ]
        ctx.recompute = named["reduction"] == "none"
        if ctx.recompute:
            ctx.save_for_backward(*(named[t.rstrip("?")] for t in op.tensors))
        else:
            ctx.save_for_backward(*output[1 + len(op.asked(named)) :])

    def backward(ctx: Any, grads: list[Tensor | None]) -> tuple[Any, ...]:
        grad = grads[0]
        if ctx.recompute:
            found = iter(backward_op(grad, *ctx.saved_tensors, *ctx.options, ctx.needs))
        else:
            found = iter(g * grad.to(g.dtype) for g in ctx.saved_tensors)
        by_name = {
            name: next(found) if present else None
            for name, present in zip(op.differentiable, ctx.present, strict=True)
        }
        return (*(by_name.get(t.rstrip("?")) for t in op.tensors), *[None] * len(op.options), None)

    torch.library.register_autograd(qualified, backward, setup_context=setup_context)


_SELECT = (("ignore_index", "int"), ("reduction", "str"))
_CHUNKS = (("chunk_size", "int?"), ("logits_dtype", "str"), ("backend", "str?"))
OPS = {
    op.name: op
    for op in (
        _Op(
            "cross_entropy",
            "unlearn_kernels.ops.cross_entropy:fused_linear_cross_entropy",
            ("hidden", "weight", "bias?", "labels", "token_weight?", "class_weight?"),
            ("hidden", "weight", "bias"),
            (
                *_SELECT,
                ("softcap", "float?"),
                ("label_smoothing", "float"),
                ("lse_square_scale", "float"),
                ("token_scaling", "bool"),
                ("shift", "bool"),
                ("return_z_loss", "bool"),
                ("return_lse", "bool"),
                ("return_token_accuracy", "bool"),
                ("return_predicted_tokens", "bool"),
                *_CHUNKS,
            ),
            (
                ("return_z_loss", "z_loss", "reduced"),
                ("return_lse", "lse", "rows"),
                ("return_token_accuracy", "token_accuracy", "reduced"),
                ("return_predicted_tokens", "predicted_tokens", "rows_long"),
            ),
        ),
        _Op(
            "kl",
            "unlearn_kernels.ops.kl:fused_linear_kl",
            (
                "hidden",
                "weight",
                "ref_hidden?",
                "ref_weight?",
                "ref_logits?",
                "labels?",
                "token_weight?",
                "bias?",
                "ref_bias?",
            ),
            ("hidden", "weight", "bias"),
            (
                ("softcap", "float?"),
                ("direction", "str"),
                ("beta", "float?"),
                ("temperature", "float"),
                *_SELECT,
                *_CHUNKS,
            ),
        ),
        _Op(
            "kl_topk",
            "unlearn_kernels.ops.kl:fused_linear_kl_topk",
            (
                "hidden",
                "weight",
                "ref_topk_index",
                "ref_topk_logprob",
                "ref_tail_logprob",
                "labels?",
                "token_weight?",
                "bias?",
            ),
            ("hidden", "weight", "bias"),
            (("softcap", "float?"), ("temperature", "float"), *_SELECT, *_CHUNKS),
        ),
    )
}
for _op in OPS.values():
    _define(_op)


def bind(name: str, **arguments: Any) -> tuple[Any, list[Any]]:
    """The operator of fused loss ``name`` and its arguments, from the public function's
    arguments by name (every one of them)."""
    op = OPS[name]
    args = [arguments[t.rstrip("?")] for t in op.tensors]
    args += [arguments[option] for option, _ in op.options]
    grad = torch.is_grad_enabled()
    needs = [
        grad and arguments[t] is not None and arguments[t].requires_grad for t in op.differentiable
    ]
    return getattr(torch.ops.unlearn_kernels, name).default, [*args, needs]


def call(name: str, **arguments: Any) -> Any:
    """The fused loss ``name`` through its operator (what the public functions do while Dynamo
    traces); ``arguments`` are the public function's, by name. Returns what it returns."""
    operator, args = bind(name, **arguments)
    outputs = operator(*args)
    asked = OPS[name].asked(arguments)
    if not asked:
        return outputs[0]
    from unlearn_kernels.ops.cross_entropy import CrossEntropyOutput

    fields = {field: value for (_, field, _), value in zip(asked, outputs[1:], strict=False)}
    return CrossEntropyOutput(loss=outputs[0], **fields)
