"""The gate/up SiLU-with-LoRA kernel against its reference: on CUDA, or on CPU under Triton's
interpreter (TRITON_INTERPRET=1 with triton installed); skipped where neither runs."""

import pytest
import torch

from es_core.engine.lora_silu import silu_lora, silu_lora_reference
from es_core.engine.population_lora import PopulationLoRA
from es_core.lora import LoRATarget, StackedLoRA
from tests.conftest import KERNEL_DEVICE as DEVICE
from tests.conftest import needs_triton_kernels

pytestmark = needs_triton_kernels


def population(members: int, d_in: int, inter: int, rank: int, modules: tuple[str, ...], dtype):
    """PopulationLoRA slots for one gate/up Linear, filled with random members (slot 1 the base)."""
    g = torch.Generator().manual_seed(rank)
    lora = PopulationLoRA({"qkv": (), "o": (), "gate_up": (("gate_proj", inter), ("up_proj", inter)), "down": ()},
                          {"qkv": d_in, "o": d_in, "gate_up": d_in, "down": inter}, 1,
                          [LoRATarget(f"model.layers.0.mlp.{m}", 0, m, d_in, inter) for m in modules], rank, dtype, DEVICE)
    tensors = {}
    for m in modules:
        a, b = torch.randn(members, rank, d_in, generator=g), torch.randn(members, inter, rank, generator=g)
        a[1], b[1] = 0, 0
        tensors[f"base_model.model.model.layers.0.mlp.{m}.lora_A.weight"] = a
        tensors[f"base_model.model.model.layers.0.mlp.{m}.lora_B.weight"] = b
    lora.set_members(StackedLoRA(tensors, members), [0.5] * members)
    return lora.layer(0).gate_up


@pytest.mark.parametrize("rank,modules,rows", [(1, ("gate_proj", "up_proj"), 32), (8, ("gate_proj", "up_proj"), 20), (4, ("up_proj",), 5)])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="Triton's CPU interpreter reads bfloat16 as raw bits (values of 1e17)"))])
def test_silu_lora_matches_its_reference_for_every_member(rank, modules, rows, dtype):
    members, d_in, inter = 3, 24, 160
    group = population(members, d_in, inter, rank, modules, dtype)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(members * rows, d_in, generator=g).to(DEVICE, dtype)
    gu = torch.randn(members * rows, 2 * inter, generator=g).to(DEVICE, dtype)
    u = torch.bmm(h.reshape(members, rows, d_in).float(), group.a.float().transpose(1, 2)).reshape(members * rows, -1)
    expected = silu_lora_reference(gu, u, group.b, group.parts, rows)
    got = silu_lora(gu, u, group.b, group.parts, rows)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)
    base = torch.nn.functional.silu(gu[rows:2 * rows, :inter].float()) * gu[rows:2 * rows, inter:].float()
    assert torch.allclose(got[rows:2 * rows].float(), base, atol=tol, rtol=tol)  # slot 1 is the base model
    assert not torch.allclose(got[:rows].float(), (torch.nn.functional.silu(gu[:rows, :inter].float()) * gu[:rows, inter:].float()), atol=tol)


def test_silu_lora_refuses_a_layout_it_cannot_compute():
    group = population(2, 8, 32, 4, ("gate_proj", "up_proj"), torch.float32)
    gu, u = torch.zeros(6, 64, device=DEVICE), torch.zeros(6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="rows are not 2 members x 4"):
        silu_lora(gu, u, group.b, group.parts, 4)
