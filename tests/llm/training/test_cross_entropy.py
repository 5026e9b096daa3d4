"""The chunked CPU loss against PyTorch's ops: values and gradients, ignored labels, bf16 logits, many chunks."""

import pytest
import torch
import torch.nn.functional as F

from llm.training import cross_entropy
from llm.training.cross_entropy import IGNORE_INDEX, ChunkedCrossEntropy, cross_entropy_and_z


def reference(logits: torch.Tensor, labels: torch.Tensor, z_weight: float) -> torch.Tensor:
    """PyTorch's cross-entropy plus z_weight times the mean squared log-partition, in float32."""
    flat, target = logits.flatten(0, 1).float(), labels.flatten()
    keep = target != IGNORE_INDEX
    ce = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX)
    return ce + z_weight * torch.logsumexp(flat[keep], dim=-1).square().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_weight", [0.0, 1e-2])
def test_chunked_loss_and_gradient_match_pytorchs(monkeypatch, dtype, z_weight):
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 3 * 37)  # 3 rows a chunk: 14 chunks, the last one short
    torch.manual_seed(0)
    logits = (torch.randn(5, 8, 37) * 3).to(dtype)
    labels = torch.randint(0, 37, (5, 8))
    labels[0, :3] = IGNORE_INDEX
    labels[4, 7] = IGNORE_INDEX
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ce, z = cross_entropy_and_z(ours_in, labels)
    loss = ce + z_weight * z
    expected = reference(ref_in, labels, z_weight)
    torch.testing.assert_close(loss, expected)
    (loss * 2.5).backward()  # an upstream gradient that is not 1
    (expected * 2.5).backward()
    assert ours_in.grad.dtype == dtype
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-4, "rtol": 1e-2}
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **tol)
    assert ours_in.grad[0, :3].abs().max() == 0  # ignored positions get no gradient


def test_float64_gradcheck_of_both_outputs():
    torch.manual_seed(1)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, IGNORE_INDEX, 2, 2, 1])
    # the function computes in float32 internally; compare with a float64 finite difference at float32's precision
    assert torch.autograd.gradcheck(
        lambda x: ChunkedCrossEntropy.apply(x, labels), (logits,), eps=1e-3, atol=1e-3, rtol=1e-3
    )


def test_nothing_labelled_is_zero_with_zero_gradient():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    ce, z = cross_entropy_and_z(logits, torch.full((2, 3), IGNORE_INDEX))
    assert ce == 0 and z == 0
    (ce + z).backward()
    assert logits.grad.abs().max() == 0
