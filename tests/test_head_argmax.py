"""The greedy head's fused matmul + argmax against F.linear + argmax: on CUDA, or on CPU under
Triton's interpreter (TRITON_INTERPRET=1 with triton installed); skipped where neither runs."""

import pytest
import torch

from es_core.engine.head_argmax import head_argmax, head_argmax_reference
from tests.conftest import KERNEL_DEVICE as DEVICE
from tests.conftest import needs_triton_kernels as needs_triton


@needs_triton
@pytest.mark.parametrize("rows,dim,vocab", [(5, 32, 100), (37, 48, 1000)])
def test_head_argmax_equals_linear_then_argmax_in_float32_ties_to_the_lowest_index(rows, dim, vocab):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, dim, generator=g), torch.randn(vocab, dim, generator=g)
    w[vocab - 3] = w[7]  # two tokens with equal logits, in different tiles: the lower index wins
    x[0] = 4 * w[7]
    x, w = x.to(DEVICE), w.to(DEVICE)
    launch = {"block_m": 16, "block_n": 32, "block_k": 16, "num_warps": 4, "num_stages": 1}  # several tiles each way
    got = head_argmax(x, w, **launch)
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, head_argmax_reference(x, w))
    assert got[0].item() == 7


@needs_triton
@pytest.mark.skipif(DEVICE != "cuda", reason="Triton's CPU interpreter reads bfloat16 as raw bits")
def test_head_argmax_in_bf16_picks_a_maximal_logit_of_the_default_launch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 896, generator=g).to(DEVICE, torch.bfloat16)
    w = (0.05 * torch.randn(20000, 896, generator=g)).to(DEVICE, torch.bfloat16)
    got = head_argmax(x, w)
    logits = torch.nn.functional.linear(x, w).float()
    # summed in another order than cuBLAS's, then rounded to bf16: a near-tie may resolve to another
    # token, whose logit is within a bf16 rounding step of the maximum
    best = logits.max(1).values
    assert (logits.gather(1, got[:, None]).squeeze(1) >= best - 0.01 * best.abs().clamp(min=1)).all()
    assert (got == head_argmax_reference(x, w)).float().mean() > 0.99


@needs_triton
def test_head_argmax_refuses_mixed_dtypes():
    with pytest.raises(ValueError, match="one dtype"):
        head_argmax(torch.zeros(2, 4, device=DEVICE), torch.zeros(3, 4, device=DEVICE, dtype=torch.float64))


def test_head_launch_shrinks_to_the_gpus_shared_memory():
    from es_core.engine.head_argmax import default_launch

    def need(launch, size):
        return (launch["block_m"] + launch["block_n"]) * launch["block_k"] * size * launch["num_stages"]

    assert default_launch(torch.bfloat16, 232448) == default_launch(torch.bfloat16)  # an H100 keeps the measured tiles
    for smem in (166912, 101376, 49152):  # A100, consumer GPUs, a small budget
        launch = default_launch(torch.bfloat16, smem)
        assert 1.15 * need(launch, 2) <= smem and launch["num_stages"] >= 2
        assert 1.15 * need(default_launch(torch.float32, smem), 4) <= smem
