"""The profile's latent read from the input of the model's final Linear (its head): one row
per item, taken from a (batch, sequence, features) input as the head's output becomes the
class scores. A head applied to every token whose row at each item's last real token the
model returns as its logits (GPT-2's ``score``; the probe finds it: ``token_head``) gives
that token's input row; any other sequence input is averaged over its real tokens
(docs/ARCHITECTURE.md, "Data model")."""
from __future__ import annotations

import torch
from torch import nn

from diagql.errors import ExecutionError
from diagql.model.input_masks import input_attention_mask
from diagql.model.views import ModuleCall, describe_output, first_output, token_index, \
    token_mean

# The real tokens a per-token head's scores may be read at, as a query's TOKEN n: the last (a
# decoder's classifier, GPT-2's), the first (a [CLS] head applied to every position).
HEAD_TOKENS = (-1, 0)


def input_rows(call: ModuleCall, module: str | None = None,
               token: int | None = None) -> torch.Tensor:
    """The input of the final linear layer (``module``) as one row per item (the profile's
    latent): a (batch, sequence, features) input at each item's ``token``-th real token
    (the catalog's ``head_token``), else averaged over its real tokens, as a sequence
    layer's output is (the layer maps its last axis)."""
    x = first_output(call.output)
    if not isinstance(x, torch.Tensor) or x.is_nested or x.ndim < 1 or x.shape[0] != call.size:
        which = "the latent layer" if module is None else f"the latent layer {module!r}"
        raise ExecutionError(f"the input of {which} (the final Linear's, by default) is "
                             f"{describe_output(call.output)}, not a tensor of one row per item "
                             f"of the batch of {call.size} (a head applied before the batch "
                             f"axis comes first?): name a layer whose output is one row per "
                             f"item as the latent, connect(..., latent=NAME), --latent NAME or "
                             f"SET latent = NAME")
    if x.ndim != 3:
        return x.flatten(1)
    real = _real(call.inputs, module, x)
    if token is None:
        return token_mean(x, real, "the input of the latent layer")
    rows = _at_token(x, real, token)
    if rows is None:
        raise ExecutionError(f"an item of this batch has no real token at the input of the "
                             f"latent layer {module!r} (its padding mask covers every position)")
    return rows


def token_head(made: dict, calls: dict, scores: torch.Tensor, inputs,
               modules: dict) -> tuple[str, int | None]:
    """(head, token) where no module returned the class scores themselves: the Linear of one
    call whose (batch, sequence, classes) output, at each item's ``token``-th real token
    (HEAD_TOKENS, read from the input's attention mask as ``input_rows`` reads it), holds the
    scores (batch, classes) exactly; ("", None) where none does. ``made``, ``calls``: the
    probe's last pass (model/probing.py), ``inputs``: its batch, named."""
    if scores.ndim != 2:
        return "", None
    for out, (name, _) in made.values():
        if calls.get(name) != 1 or not isinstance(modules.get(name), nn.Linear) or \
                out.ndim != 3 or out.shape[0] != scores.shape[0] or \
                out.shape[2] != scores.shape[1] or out.dtype != scores.dtype:
            continue
        real = _real(inputs, name, out)
        for token in HEAD_TOKENS:
            rows = _at_token(out, real, token)
            if rows is not None and torch.equal(rows, scores):
                return name, token
    return "", None


def _real(inputs, module: str | None, x: torch.Tensor) -> torch.Tensor | None:
    """(batch, sequence) True at the real tokens of ``x``, from the batch input's attention
    mask where its shape is ``x``'s; None: every position counts."""
    mask = input_attention_mask(inputs, module)
    return (mask != 0).to(x.device) if mask is not None and mask.shape == x.shape[:2] else None


def _at_token(x: torch.Tensor, real: torch.Tensor | None, token: int) -> torch.Tensor | None:
    if real is None:
        real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    index = token_index(real, token)
    return None if index is None else x[torch.arange(len(x), device=x.device), index]
