"""Micro-batches, padded or packed, and the per-token losses of the training step.

Packed rows concatenate a micro-batch's examples with no padding; position ids restart per example
and attention stays within each example (`packed_sdpa`, or a varlen kernel such as flash_attention_2),
so every example's loss equals its padded loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .examples import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def shifted_labels(input_ids: list[int], prompt_tokens: int) -> list[int]:
    """Next-token labels of one example: position i is scored on token i+1 when that is a target token.

    Built per example, so a packed row never scores one example's token from another's.
    """
    n = len(input_ids)
    return [input_ids[i + 1] if i + 1 >= prompt_tokens else IGNORE_INDEX for i in range(n - 1)] + [IGNORE_INDEX]


@dataclass
class MicroBatch:
    input_ids: "torch.Tensor"          # (rows, length)
    labels: "torch.Tensor"             # shifted labels, -100 where no loss
    attention_mask: "torch.Tensor | None"
    position_ids: "torch.Tensor | None"
    example_of: "torch.Tensor"         # which example each position belongs to (-1: padding)
    tokens: int                        # real (non-padding) tokens
    target_tokens: int                 # tokens with a loss


def pad_batch(examples: list[tuple[list[int], int]], pad_id: int) -> MicroBatch:
    """One example per row, right-padded to the longest (attention mask marks the padding)."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    rows = len(examples)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    example_of = torch.full((rows, width), -1, dtype=torch.long)
    for r, (ids, p) in enumerate(examples):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        labels[r, :n] = torch.tensor(shifted_labels(ids, p))
        mask[r, :n] = 1
        example_of[r, :n] = r
    return MicroBatch(input_ids, labels, mask, None, example_of, int(mask.sum()), int((labels != IGNORE_INDEX).sum()))


def pack_batch(examples: list[tuple[list[int], int]], pad_id: int) -> MicroBatch:
    """All examples of the micro-batch concatenated into one row: no padding at all.

    Position ids restart at 0 for every example and no attention mask is passed. transformers reads the
    restarts as sequence boundaries: `flash_attention_2` runs them as varlen attention, sdpa/eager build
    a block-diagonal causal mask, and this module's `packed_sdpa` (the default when packing) runs sdpa
    on each example's span alone. Either way no token attends across examples.
    """
    import torch

    ids = [t for example, _ in examples for t in example]
    labels = [t for example, p in examples for t in shifted_labels(example, p)]
    positions = [i for example, _ in examples for i in range(len(example))]
    owner = [i for i, (example, _) in enumerate(examples) for _ in example]
    mb_labels = torch.tensor([labels])
    return MicroBatch(torch.tensor([ids]), mb_labels, None, torch.tensor([positions]), torch.tensor([owner]),
                      len(ids), int((mb_labels != IGNORE_INDEX).sum()))


def make_micro_batch(examples: list[tuple[list[int], int]], pad_id: int, packing: bool) -> MicroBatch:
    if not examples:
        # Every worker must run the same number of forward passes (ZeRO-3 gathers parameters in them):
        # an empty micro-batch at the end of an epoch becomes one padding token without loss.
        return pad_batch([([pad_id], 1)], pad_id)
    return pack_batch(examples, pad_id) if packing else pad_batch(examples, pad_id)


PACKED_SDPA = "instructrag_packed_sdpa"


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                **kwargs):
    """Varlen attention without a varlen kernel: sdpa on each packed example's span alone (causal).

    Registered with transformers' AttentionInterface (`use_packed_sdpa`). Spans start wherever the
    position ids do not count up by one, as transformers itself detects packed rows; no (length x
    length) mask is built and nothing is computed across examples, so a packed row costs what its
    examples cost alone. With no mask and no restarts (padded batches are right-padded) it is plain
    causal sdpa, exact for every real token.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    kwargs.pop("is_causal", None)
    if position_ids is None or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    length = query.shape[2]
    rows = []
    for r in range(query.shape[0]):
        pos = position_ids[r if position_ids.shape[0] > 1 else 0]
        cuts = [0] + (torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1).tolist() + [length]
        spans = [sdpa_attention_forward(module, query[r:r + 1, :, a:b], key[r:r + 1, :, a:b],
                                        value[r:r + 1, :, a:b], None, dropout=dropout, scaling=scaling,
                                        is_causal=True, **kwargs)[0] for a, b in zip(cuts, cuts[1:])]
        rows.append(torch.cat(spans, dim=1))
    return torch.cat(rows, dim=0), None


def use_packed_sdpa() -> str:
    """Register `packed_sdpa` with transformers; returns its attn_implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)
    return PACKED_SDPA


def token_losses(model, mb: MicroBatch) -> "torch.Tensor":
    """Per-position next-token loss (0 where there is no label), shape (rows, length).

    The LM head and the softmax run only at the positions that have a label in some row
    (`logits_to_keep`): prompts and documents are most of the tokens and have none, and over a vocabulary
    of ~50k the logits are a large share of a small model's step. Models whose forward has no
    `logits_to_keep` get all logits, with the same result.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    labels = mb.labels.to(device)
    keep = torch.nonzero((labels != IGNORE_INDEX).any(dim=0)).flatten()
    kwargs = {"logits_to_keep": keep} if _keeps_logits(model) and len(keep) else {}
    out = model(input_ids=mb.input_ids.to(device),
                attention_mask=None if mb.attention_mask is None else mb.attention_mask.to(device),
                position_ids=None if mb.position_ids is None else mb.position_ids.to(device), use_cache=False,
                **kwargs)
    logits = out.logits.float()
    kept = labels[:, keep] if kwargs else labels
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), kept.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").view(kept.shape)
    if not kwargs:
        return losses
    full = torch.zeros(labels.shape, dtype=losses.dtype, device=device)
    full[:, keep] = losses
    return full


def _keeps_logits(model) -> bool:
    import inspect

    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    return "logits_to_keep" in inspect.signature(module.forward).parameters


def example_losses(losses: "torch.Tensor", mb: MicroBatch, n_examples: int) -> list[float]:
    """Mean loss over each example's target tokens (index = position in the list given to the batcher)."""
    out = []
    for i in range(n_examples):
        sel = (mb.example_of == i) & (mb.labels != IGNORE_INDEX)
        out.append(float(losses[sel.to(losses.device)].sum() / sel.sum()))
    return out
