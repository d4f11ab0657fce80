"""The PACL objective (paper 3.3; SPEC "Masks and loss" and "Python contract").

Pure tensor math: no ranks, devices or Ray. Gathering features across workers happens before
these functions are called (see :mod:`pacl_ray.core.dist` and :mod:`pacl_ray.stages.train`), so the masks
are always built on the global batch.

Partition codes: 1 strong-coupled, 2 partial emotional-only, 3 partial factual-only,
4 weak-coupled. With every code 1, :func:`pacl_loss` is the symmetric CLIP InfoNCE loss.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

PARTITION_CODES = (1, 2, 3, 4)
STRONG, PARTIAL_EMOTIONAL, PARTIAL_FACTUAL, WEAK = PARTITION_CODES
PROGRESSIVE_PHASES = ((1,), (1, 2, 3), (1, 2, 3, 4))  # Eqs. 15-17, by thirds of the epochs


def _check_inputs(sim: torch.Tensor, partition: torch.Tensor, *labels: torch.Tensor) -> None:
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be square [N, N], got {tuple(sim.shape)}")
    n = sim.shape[0]
    for name, tensor in (("partition", partition), *(("labels", t) for t in labels)):
        if tensor.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {tuple(tensor.shape)}")
    if n and ((partition < 1) | (partition > 4)).any():
        bad = partition[(partition < 1) | (partition > 4)][0].item()
        raise ValueError(f"partition codes must be 1-4, got {bad}")


@torch.no_grad()
def _positives_and_negatives(
    sim: torch.Tensor, partition: torch.Tensor, factual_labels: torch.Tensor, emotional_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pos_image [N], neg_image [N, N], pos_text [N], neg_text [N, N])``: each anchor's single
    positive as an index, and its negatives as a mask row that never holds the anchor or its positive."""
    _check_inputs(sim, partition, factual_labels, emotional_labels)
    n = sim.shape[0]
    device = sim.device
    f = factual_labels.to(device)
    e = emotional_labels.to(device)
    code = partition.to(device)

    # Best partners over the whole batch; argmax returns the lowest index on ties.
    best_text_of_image = sim.argmax(dim=1)  # lv(i) = argmax_k s_ik
    best_image_of_text = sim.argmax(dim=0)  # lt(i) = argmax_k s_ki

    # Exclusion sets as [anchor, candidate] masks, applied only to the anchors that use them
    # (codes 2 and 4 exclude the factual sets, codes 3 and 4 the emotional ones).
    c = code[:, None]
    uses_factual = (c == PARTIAL_EMOTIONAL) | (c == WEAK)
    uses_emotional = (c == PARTIAL_FACTUAL) | (c == WEAK)
    f_of_best_image = f[best_image_of_text]  # f_lt(j) for each text j
    e_of_best_text = e[best_text_of_image]  # e_lv(j) for each image j
    # t_j in m_f^-1(v_i) iff f_i = f_lt(j);   t_j in m_e(v_i) iff e_j = e_lv(i)
    excluded_image = (uses_factual & (f[:, None] == f_of_best_image[None, :])) | (
        uses_emotional & (e[None, :] == e_of_best_text[:, None])
    )
    # v_j in m_f(t_i) iff f_j = f_lt(i);      v_j in m_e^-1(t_i) iff e_i = e_lv(j)
    excluded_text = (uses_factual & (f[None, :] == f_of_best_image[:, None])) | (
        uses_emotional & (e[:, None] == e_of_best_text[None, :])
    )

    # Positive: the pair itself, or for weak-coupled anchors the best partner (Eqs. 12, 13).
    arange = torch.arange(n, device=device)
    weak = code == WEAK
    pos_image = torch.where(weak, best_text_of_image, arange)
    pos_text = torch.where(weak, best_image_of_text, arange)

    neg_image = excluded_image.logical_not_()
    neg_text = excluded_text.logical_not_()
    for neg, pos in ((neg_image, pos_image), (neg_text, pos_text)):
        neg[arange, arange] = False  # Q never contains i
        neg[arange, pos] = False  # the positive is counted once in the denominator, as positive
    return pos_image, neg_image, pos_text, neg_text


def pacl_masks(
    sim: torch.Tensor,
    partition: torch.Tensor,
    factual_labels: torch.Tensor,
    emotional_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positive and negative candidate masks of every anchor (SPEC table, Eqs. 6-14).

    Args:
        sim: [N, N] cosines, image rows and text columns: ``sim[i, j] = z^v_i . z^t_j``.
        partition: [N] int64 codes 1-4.
        factual_labels: [N] int64 factual pseudo-labels f_i of the images.
        emotional_labels: [N] int64 emotional pseudo-labels e_i of the texts.

    Returns:
        ``(pos_image, neg_image, pos_text, neg_text)``, each bool [N, N]. Row i of ``*_image`` is
        anchor v_i over texts j; row i of ``*_text`` is anchor t_i over images j. Positives and
        negatives are disjoint and every row has exactly one positive.
    """
    pos_image, neg_image, pos_text, neg_text = _positives_and_negatives(
        sim.detach(), partition, factual_labels, emotional_labels
    )
    n = sim.shape[0]
    rows = torch.arange(n, device=sim.device)
    pos_image_mask = torch.zeros((n, n), dtype=torch.bool, device=sim.device)
    pos_text_mask = torch.zeros((n, n), dtype=torch.bool, device=sim.device)
    pos_image_mask[rows, pos_image] = True
    pos_text_mask[rows, pos_text] = True
    return pos_image_mask, neg_image, pos_text_mask, neg_text


def pacl_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    partition: torch.Tensor,
    factual_labels: torch.Tensor,
    emotional_labels: torch.Tensor,
    temperature: float,
    active: Iterable[int] = PARTITION_CODES,
) -> dict[str, torch.Tensor]:
    """The partition-adaptive contrastive loss (Eq. 3 per anchor, L_k per partition).

    Args:
        image_features: [N, D] L2-normalised projected image features z^v.
        text_features: [N, D] L2-normalised projected text features z^t.
        partition: [N] int64 codes 1-4.
        factual_labels: [N] int64 image pseudo-labels.
        emotional_labels: [N] int64 text pseudo-labels.
        temperature: tau (paper: 0.07).
        active: the partitions whose L_k enter ``total`` (the progressive phase).

    Returns:
        Scalar tensors ``L1``..``L4`` (0 for a partition absent from the batch) and ``total``, the
        sum of the active L_k. Half-precision inputs are computed in float32; float64 stays float64.
    """
    active = tuple(int(k) for k in active)
    if any(k not in PARTITION_CODES for k in active):
        raise ValueError(f"active partitions must be among 1-4, got {active}")
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"features must both be [N, D]; got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    sim = image_features.to(dtype) @ text_features.to(dtype).T  # [N, N] image rows, text columns
    pos_i, neg_i, pos_t, neg_t = _positives_and_negatives(
        sim.detach(), partition, factual_labels, emotional_labels
    )
    rows = torch.arange(sim.shape[0], device=sim.device)
    neg_i[rows, pos_i] = True  # from here on these masks are the denominator sets P u Q
    neg_t[rows, pos_t] = True

    logits = sim / temperature
    # -log(exp(s_pos) / sum_{P u Q} exp(s)): with one positive per row the numerator is a gather.
    # A text anchor's candidates are a column of the image-row logits: reduce over dim 0 rather
    # than materialising a transposed copy. Every denominator holds its positive, so no row of
    # the log-sum-exp is all -inf.
    image_term = torch.logsumexp(logits.masked_fill(~neg_i, float("-inf")), dim=1) - logits[rows, pos_i]
    text_term = torch.logsumexp(logits.masked_fill(~neg_t.T, float("-inf")), dim=0) - logits[pos_t, rows]
    per_anchor = 0.5 * (image_term + text_term)

    code = partition.to(per_anchor.device)
    out: dict[str, torch.Tensor] = {}
    for k in PARTITION_CODES:
        in_k = code == k
        # Sum over a masked selection keeps the graph even when the partition is empty.
        out[f"L{k}"] = (per_anchor * in_k).sum() / in_k.sum().clamp(min=1)
    out["total"] = sum((out[f"L{k}"] for k in active), start=per_anchor.new_zeros(()))
    return out


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Plain symmetric InfoNCE (CLIP), for comparison: cross-entropy in both directions."""
    logits = image_features @ text_features.T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (
        nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)
    )


def phase_partitions(epoch: int, epochs: int, schedule: str = "progressive") -> tuple[int, ...]:
    """Partitions trained on (and loss terms summed) in ``epoch`` of ``epochs`` (Eqs. 15-17).

    ``progressive``: [0, E/3) -> (1,); [E/3, 2E/3) -> (1, 2, 3); [2E/3, E) -> (1, 2, 3, 4).
    ``all``: every partition in every epoch.
    """
    if schedule == "all":
        return PARTITION_CODES
    if schedule != "progressive":
        raise ValueError(f"unknown schedule {schedule!r}; use 'progressive' or 'all'")
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch {epoch} outside [0, {epochs})")
    # Integer form of epoch < E/3 and epoch < 2E/3, exact for every E.
    if 3 * epoch < epochs:
        return PROGRESSIVE_PHASES[0]
    if 3 * epoch < 2 * epochs:
        return PROGRESSIVE_PHASES[1]
    return PROGRESSIVE_PHASES[2]


class PACLLoss(nn.Module):
    """Module form of :func:`pacl_loss` with a fixed temperature (not learned, as in the paper)."""

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        partition: torch.Tensor,
        factual_labels: torch.Tensor,
        emotional_labels: torch.Tensor,
        active: Iterable[int] = PARTITION_CODES,
    ) -> dict[str, torch.Tensor]:
        return pacl_loss(
            image_features, text_features, partition, factual_labels, emotional_labels,
            self.temperature, active,
        )
