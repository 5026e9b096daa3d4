"""The language-model loss: cross-entropy over the vocabulary and PaLM's z-loss term, from one log-sum-exp.

``cross_entropy_and_z(logits, labels)`` gives both means over the labelled positions (labels ``IGNORE_INDEX`` do
not count). On the CPU they come from ``ChunkedCrossEntropy``, our own autograd function; elsewhere from PyTorch's
ops. Why our own on the CPU: ``F.cross_entropy(logits.float())`` writes four float32 (N, V) tensors per step (the
upcast logits, the log-probabilities, the zero-filled gradient of the picked entries, the gradient itself) and a
fifth for the cast back, each a pass through memory that the CPU's caches cannot hold at N = 4,096 tokens and
V = 4,096. Processing a few hundred rows at a time in float32, reading the compute-dtype logits and writing their
gradient once, is 2.5x faster for those shapes (32 ms against 80 ms forward and backward: ``python
bench/cpu_kernels.py``, each a sixth of a default training step before) and never holds a float32 (N, V) tensor. On a GPU, where PyTorch's kernels are fused and a
loop over chunks of rows would be a loop of small launches, the plain ops stay.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 19  # float32 elements per chunk (2 MiB): within a core's L2, measured best at V = 4,096


def cross_entropy_and_z(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and the z-loss term (the mean of log(Z)^2, Z the softmax's normaliser), both float32 means
    over the labelled positions; nothing labelled gives 0, not NaN. logits (B, T, V) in any float dtype, labels
    (B, T).

    Cross-entropy is unchanged when every logit of a position shifts by the same amount, so nothing stops the
    logits drifting up together until bf16 rounds them badly; the z-loss term pulls log(Z) towards 0 (PaLM weights
    it 1e-4). Computing cross-entropy as log(Z) - logit[label] shares the (N, V) log-sum-exp with the term.
    """
    flat, target = logits.flatten(0, 1), labels.flatten()  # (N, V), (N,)
    if flat.device.type == "cpu":
        return ChunkedCrossEntropy.apply(flat, target)
    flat = flat.float()
    keep = target != IGNORE_INDEX
    log_z = torch.logsumexp(flat, dim=-1)  # (N,)
    picked = flat.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,) the label's logit
    n = keep.sum().clamp(min=1)
    return ((log_z - picked) * keep).sum() / n, (log_z.square() * keep).sum() / n


class ChunkedCrossEntropy(torch.autograd.Function):
    """(N, V) logits and (N,) labels -> (cross-entropy, z term), computed in float32 a chunk of rows at a time.

    Backward, per row of a labelled position, with p = softmax(logits) and n labelled positions:
    d ce / d logits = (p - onehot(label)) / n and d z / d logits = 2 log(Z) p / n. Only log(Z) (N,) is saved
    besides the inputs, and the gradient is written in the logits' dtype, as autograd's cast back would.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = max(1, CHUNK_ELEMENTS // logits.shape[1])
        log_z = torch.cat([torch.logsumexp(c.float(), dim=-1) for c in logits.split(rows)])  # (N,)
        keep = target != IGNORE_INDEX
        picked = logits.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1).float()  # (N,)
        n = keep.sum().clamp(min=1)
        ctx.save_for_backward(logits, target, log_z, n)
        ctx.rows = rows
        return ((log_z - picked) * keep).sum() / n, (log_z.square() * keep).sum() / n

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_z: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, target, log_z, n = ctx.saved_tensors
        keep = (target != IGNORE_INDEX).float()
        # per row: the softmax's weight (ce's and the z term's) and the label's extra -grad_ce, over n
        softmax_scale = (grad_ce + 2 * grad_z * log_z) * keep / n  # (N,)
        label_scale = grad_ce * keep / n  # (N,)
        grad = torch.empty_like(logits)
        labels = target.clamp(min=0)
        for start in range(0, logits.shape[0], ctx.rows):
            rows = slice(start, start + ctx.rows)
            p = torch.exp(logits[rows].float() - log_z[rows, None])  # (r, V) the softmax
            p.mul_(softmax_scale[rows, None])
            p.scatter_add_(1, labels[rows, None], -label_scale[rows, None])
            grad[rows] = p
        return grad, None
