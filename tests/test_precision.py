"""What the engine evaluates is what the ES update credits: in a bf16 model (the CUDA default) the
members' LoRA slots hold their float32 values, not theta + sigma * eps rounded to bf16. Measured at
the paper's sigma 0.001 and at 0.05 on a SmolLM2-shaped q_proj (in = out = 576, rank 1, A drawn as
init_centre does, B of a trained centre); run with -s to see the figures."""

import pytest
import torch

from es_core.engine.population_lora import PopulationLoRA, lora_delta
from es_core.es import ask, draw_population
from es_core.search_space import LORA_SPACE
from es_core.lora import LoRATarget, init_centre
from es_core.seeding import standard_normal_f32

D, RANK, MEMBERS, SCALING = 576, 1, 16, 2.0
TARGET = LoRATarget("model.layers.0.self_attn.q_proj", 0, "q_proj", D, D)


def trained_centre() -> dict[str, torch.Tensor]:
    centre = init_centre([TARGET], RANK, seed=0)
    centre[TARGET.key_b] = torch.from_numpy(standard_normal_f32("test-b", D * RANK)).view(D, RANK) * 0.02
    return centre


def slots(population, dtype, **options) -> object:
    lora = PopulationLoRA({"qkv": (("q_proj", D),), "o": (), "gate_up": (), "down": ()}, {"qkv": D, "o": D, "gate_up": D, "down": D}, 1,
                          [TARGET], RANK, dtype, "cpu", **options)
    lora.set_members(population, [SCALING] * len(population))
    return lora.layer(0).qkv


def relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    return float(error.double().norm() / reference.double().norm())


@pytest.mark.parametrize("sigma", [0.001, 0.05])
def test_a_bf16_models_slots_hold_the_credited_members_exactly(sigma):
    centre = trained_centre()
    population = LORA_SPACE.members(centre, draw_population(ask(0, 0, MEMBERS, sigma), LORA_SPACE.noise_layout(centre)))
    group = slots(population, torch.bfloat16)
    a_member, b_member = population.tensors[TARGET.key_a], population.tensors[TARGET.key_b]
    assert torch.equal(group.a[:, :RANK], a_member) and torch.equal(group.b[:, :, :RANK], b_member * SCALING)

    credited = a_member - centre[TARGET.key_a]  # sigma * sign * eps, as the update credits it
    realised = group.a[:, :RANK] - centre[TARGET.key_a]
    rounded = a_member.to(torch.bfloat16).float() - centre[TARGET.key_a].to(torch.bfloat16).float()  # what bf16 slots held
    print(f"\nsigma {sigma}: perturbation of A realised in the slots vs credited: {relative(realised - credited, credited):.2e} (L2); "
          f"in bf16 slots {relative(rounded - credited, credited):.2%}, {float((rounded == 0).float().mean()):.1%} of entries zero")
    assert relative(realised - credited, credited) == 0.0
    assert relative(rounded - credited, credited) > 1e-3  # the measurement sees what bf16 did


@pytest.mark.parametrize("sigma", [0.001, 0.05])
def test_the_lora_path_in_a_bf16_model_applies_the_float32_member(sigma):
    """The layer's LoRA delta of a member minus the centre's (the perturbation's effect), from bf16
    activations, against float64: what remains is the rounding of the delta to the model's bf16,
    which no choice of slots removes; bf16 slots added their own rounding of A and B."""
    centre = trained_centre()
    population = LORA_SPACE.members(centre, draw_population(ask(0, 0, MEMBERS, sigma), LORA_SPACE.noise_layout(centre)))
    x = torch.randn(MEMBERS * 4, 1, D, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 4 rows per member
    rows = torch.arange(MEMBERS * 4) // 4
    a, b = population.tensors[TARGET.key_a].double()[rows], population.tensors[TARGET.key_b].double()[rows] * SCALING
    centre_delta = (x.double() @ centre[TARGET.key_a].double().T) @ (centre[TARGET.key_b].double() * SCALING).T
    effect = torch.einsum("ntr,nor->nto", torch.einsum("ntd,nrd->ntr", x.double(), a), b) - centre_delta

    group = slots(population, torch.bfloat16)
    now = relative(lora_delta(x, group).double() - centre_delta - effect, effect)
    exact = relative(lora_delta(x.float(), group).double() - centre_delta - effect, effect)  # the same slots, float32 output
    bf16_slots = group._replace(a=group.a.to(torch.bfloat16), b=group.b.to(torch.bfloat16))
    before = relative(lora_delta(x, bf16_slots).double() - centre_delta - effect, effect)
    print(f"\nsigma {sigma}: the perturbation's effect on the LoRA delta vs float64: {now:.2%} "
          f"(float32 slots, bf16 output; {exact:.1e} before that rounding), {before:.2%} with bf16 slots")
    assert exact < 1e-4
    assert now < before


def test_slots_in_the_models_dtype_are_the_opt_in_that_rounds():
    """generation.lora_dtype=model: the engine's faster slots, rounded as measured above."""
    from es_core.engine.generate import PopulationEngine

    centre = trained_centre()
    population = LORA_SPACE.members(centre, draw_population(ask(0, 0, MEMBERS, 0.001), LORA_SPACE.noise_layout(centre)))
    group = slots(population, torch.bfloat16, slot_dtype=torch.bfloat16)
    assert group.a.dtype == torch.bfloat16 and not torch.equal(group.a[:, :RANK].float(), population.tensors[TARGET.key_a])
    with pytest.raises(ValueError, match="lora_dtype must be float32 or model"):
        PopulationEngine(None, [TARGET], RANK, pad_id=0, eos_ids=[2], lora_dtype="bf16")
