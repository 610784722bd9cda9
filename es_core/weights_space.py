"""ES in weight space: low-rank perturbations of the weights themselves, the centre a rank-R adapter.

LoRA-space ES (es.py) searches the factors A and B of an adapter whose B starts at zero: a member
changes a weight, to first order, by sigma * eps_B A, inside the row space of one random A. Here
(`es.space: weights`, after EGGROLL, arXiv 2511.16652, and LOZO) theta is the weights W of every
target Linear, and member i perturbs each one by a fresh rank-r Gaussian product

    W_i = W + sigma * s_W * E_i,    E_i = b_i a_i / sqrt(r),   b_i [out, r], a_i [r, in] ~ N(0, 1)

(s_W = 1, or the RMS of W when `es.sigma_scale` is `weight_rms`; antithetic partners share b_i, a_i
and flip the sign). The update is the paper's, in the same units:

    W <- W + alpha * s_W * (1/N) * sum_i w_i * sign_i * E_i

which is full rank over generations. The base model never changes during a run: the accumulated
change W - W_0 is the centre, kept as its top-`centre_rank` singular directions, a PEFT adapter
(B = U S, A = V^T, scaling 1) that PEFT, SGLang, replay and the ledger take as they take any
adapter. Each update re-factorises centre + update exactly in float64 (a QR of the stacked factors
on each side, an SVD of the small core, signs fixed) and keeps the top R; what the truncation drops
is reported (`truncation_kept`). A target whose min(out, in) is at most R is not truncated at all:
its centre is the accumulated change itself in float32 (B = change, A = identity, or the other way
round: `exact`), so R = the largest min(out, in), 576 at SmolLM2-135M, is ES over the full weights
with float32 master copies of the change. A member is then the centre plus its own rank r: an adapter of rank
R + r (the centre's factors, then the member's), and for the embedded engine the centre in one
shared slot under every member's rank-r slot.

The noise is the run's Philox scheme (seeding.py), one stream per member seed cut into the targets'
a and b in sorted key order (`noise_layout` of a rank-r template): bit-identical on every machine,
drawn once per generation (es.draw_population_noise); so a member's artifact is a record of a few
hundred bytes (`MemberRecord`: its centre's id, seed, sign, sigma, r, the sigma scales) from which
its factors are drawn again bit for bit. The re-factorisation is LAPACK's: identical on
one machine; another CPU may differ in the last bits of a float64, which the cast to float32 almost
always absorbs (a centre's hash can then differ where a resume moves machines; its values do not).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from es_core.es import DrawnPopulation, ESState, Member, NoiseLayout, PopulationNoise, PopulationPlan, draw_population_noise
from es_core.lora import _KEY_RE, AdapterSpec, LoRATarget, LoRATensors, StackedLoRA, adapter_files
from es_core.seeding import NOISE_SCHEME

# singular values below this fraction of the largest are dropped (their directions would be LAPACK's
# arbitrary choice, so a centre's bytes would depend on the library; their share of the norm is nil)
_RELATIVE_TOL = 1e-10


@dataclass(frozen=True)
class WeightsLayout:
    """What a weights-space run perturbs: its targets (sorted by key), the noise rank r, the centre
    rank R and each target's sigma scale s_W (1, or the RMS of its base weight)."""

    targets: tuple[LoRATarget, ...]
    noise_rank: int
    centre_rank: int
    scales: tuple[float, ...]

    def __post_init__(self):
        if len(self.scales) != len(self.targets):
            raise ValueError(f"{len(self.targets)} targets but {len(self.scales)} sigma scales")
        if self.noise_rank < 1 or self.centre_rank < 1:
            raise ValueError(f"noise rank and centre rank must be >= 1 (got {self.noise_rank}, {self.centre_rank})")

    @property
    def noise(self) -> tuple[tuple[str, int], ...]:
        """(key, numel) of each member's factors, in the order its noise stream is cut: a (lora_A's
        key, [r, in]) and b (lora_B's key, [out, r]) of every target."""
        template = self.template(self.noise_rank)
        return tuple((k, template[k].numel()) for k in sorted(template))

    def template(self, rank: int) -> LoRATensors:
        """Zero LoRA tensors of `rank` on every target (the generation-0 centre at rank R)."""
        out: LoRATensors = {}
        for t in self.targets:
            out[t.key_a] = torch.zeros(rank, t.in_features, dtype=torch.float32)
            out[t.key_b] = torch.zeros(t.out_features, rank, dtype=torch.float32)
        return dict(sorted(out.items()))


def spec_of_rank(spec: AdapterSpec, rank: int) -> AdapterSpec:
    """`spec`'s targets at `rank`, lora_alpha = rank: PEFT's scaling alpha / r is 1, every scale is in B."""
    return AdapterSpec(rank, float(rank), spec.target_modules, spec.layers)


def weights_layout(targets: Sequence[LoRATarget], noise_rank: int, centre_rank: int, scales: Sequence[float] | None = None) -> WeightsLayout:
    ordered = sorted(targets, key=lambda t: t.key_a)
    if scales is None:
        scales = [1.0] * len(ordered)
    else:
        by_key = dict(zip((t.key_a for t in targets), scales))
        scales = [by_key[t.key_a] for t in ordered]
    return WeightsLayout(tuple(ordered), int(noise_rank), int(centre_rank), tuple(float(s) for s in scales))


def weight_rms(weights: dict[str, torch.Tensor], targets: Sequence[LoRATarget]) -> list[float]:
    """RMS of each target's base weight (`weights` by module path + '.weight'), in float64, rounded
    to float32 so the same model gives the same scales whatever its file's dtype ordering."""
    out = []
    for t in targets:
        w = weights[f"{t.path}.weight"].detach().to("cpu", torch.float64)
        out.append(float(torch.tensor(float(w.pow(2).mean().sqrt()), dtype=torch.float32)))
    return out


# --- ask: the members' own factors --------------------------------------------------------------


def member_factors(layout: WeightsLayout, noise: PopulationNoise, members: Sequence[Member], sigma: float) -> StackedLoRA:
    """Every member's own rank-r factors, stacked per key: A = a_i, B = sigma * s_W * sign_i * b_i / sqrt(r)
    (scaling 1). With the centre applied beside them, member i is W + centre + sigma * s_W * sign_i * E_i."""
    r = layout.noise_rank
    rows = noise.rows([m.seed for m in members])  # [N, total] (partners repeat their seed's row)
    sign = torch.tensor([float(m.sign) for m in members], dtype=torch.float32)
    out, offset, sizes = {}, 0, dict(noise.layout)
    scale = _scale_by_key(layout)
    for key in noise.keys:
        n = sizes[key]
        flat = rows[:, offset:offset + n]
        offset += n
        target = scale[key][0]
        if key == target.key_a:
            out[key] = flat.reshape(len(members), r, target.in_features).clone()
        else:
            coef = (sigma * scale[key][1] / math.sqrt(r)) * sign
            out[key] = coef[:, None, None] * flat.reshape(len(members), target.out_features, r)
    return StackedLoRA(out, len(members))


def _scale_by_key(layout: WeightsLayout) -> dict[str, tuple[LoRATarget, float]]:
    out = {}
    for t, s in zip(layout.targets, layout.scales):
        out[t.key_a] = (t, s)
        out[t.key_b] = (t, s)
    return out


def member_adapter(centre: LoRATensors, own: LoRATensors) -> LoRATensors:
    """One member as an adapter of rank R + r: the centre's factors, then its own (B A splits into
    the centre's B_c A_c plus the member's b a, exactly)."""
    return {key: torch.cat([value, own[key]], 0 if key.endswith("lora_A.weight") else 1) for key, value in sorted(centre.items())}


def split_member_adapter(tensors: LoRATensors, centre_rank: int) -> tuple[LoRATensors, LoRATensors]:
    """A rank R + r adapter as (centre part, rank R; own part, rank r): member_adapter's inverse."""
    centre, own = {}, {}
    for key, value in tensors.items():
        if key.endswith("lora_A.weight"):
            centre[key], own[key] = value[:centre_rank], value[centre_rank:]
        else:
            centre[key], own[key] = value[:, :centre_rank], value[:, centre_rank:]
    return centre, own


# --- tell: the update, re-factorised to rank R -------------------------------------------------


@dataclass(frozen=True)
class Refactorised:
    """The new centre and what the truncation to rank R cost."""

    centre: LoRATensors
    update_norm: float  # ||alpha * s_W * (1/N) sum_i w_i sign_i E_i||_F over every target, before truncation
    truncation_error: float  # ||(centre + update) - new centre||_F over every target

    @property
    def truncation_kept(self) -> float:
        """The fraction of the update's norm the rank-R centre kept (1 when nothing was dropped)."""
        return 1.0 if self.update_norm == 0 else max(0.0, 1.0 - self.truncation_error / self.update_norm)


def seed_coefficients(members: Sequence[Member], weights: Sequence[float], learning_rate: float) -> dict[int, float]:
    """alpha * (1/N) * sum of w_i * sign_i over the members of each seed (antithetic partners share one)."""
    out: dict[int, float] = {}
    n = len(members)
    for m, w in zip(members, weights):
        out[m.seed] = out.get(m.seed, 0.0) + m.sign * float(w)
    return {seed: learning_rate * c / n for seed, c in out.items()}


def tell(centre: LoRATensors, layout: WeightsLayout, noise: PopulationNoise, members: Sequence[Member], weights: Sequence[float],
         learning_rate: float) -> Refactorised:
    """centre + alpha * s_W * (1/N) * sum_i w_i sign_i E_i, as its top-R singular directions. Targets
    of one shape are re-factorised together (one batched QR and SVD per shape)."""
    coefficient = seed_coefficients(members, weights, learning_rate)
    seeds = [s for s in noise.seeds if coefficient.get(s, 0.0) != 0.0]
    r, rank, k = layout.noise_rank, layout.centre_rank, len(seeds) * layout.noise_rank
    eps = noise.rows(seeds).double() if seeds else torch.zeros(0, sum(n for _, n in noise.layout), dtype=torch.float64)
    coef = torch.tensor([coefficient[s] for s in seeds], dtype=torch.float64)
    offsets, pos = {}, 0
    for key, n in noise.layout:
        offsets[key] = (pos, pos + n)
        pos += n
    by_shape: dict[tuple[int, int], list[tuple[LoRATarget, float]]] = {}
    for t, s_w in zip(layout.targets, layout.scales):
        by_shape.setdefault((t.out_features, t.in_features), []).append((t, s_w))
    new: LoRATensors = {}
    update_sq = error_sq = 0.0
    for (out_f, in_f), group in by_shape.items():
        # the seeds' a_i stacked as rows [G, S*r, in]; b_i * c_i * s_W / sqrt(r) as columns [G, out, S*r]
        a = torch.stack([eps[:, slice(*offsets[t.key_a])].reshape(k, in_f) for t, _ in group])
        b = torch.stack([(eps[:, slice(*offsets[t.key_b])].reshape(len(seeds), out_f, r) * (coef * s_w / math.sqrt(r))[:, None, None])
                         .permute(1, 0, 2).reshape(out_f, k) for t, s_w in group])
        if k:  # ||b a||_F^2 from the Gram matrices
            update_sq += float(((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum())
        b_c = torch.stack([centre[t.key_b] for t, _ in group])
        a_c = torch.stack([centre[t.key_a] for t, _ in group])
        if min(out_f, in_f) <= rank:  # the centre holds every direction: accumulate, drop nothing
            b_new, a_new = exact(dense_of(b_c, a_c) + b @ a, rank)
        else:
            b_new, a_new, dropped_sq = truncate(torch.cat([b_c.double(), b], 2), torch.cat([a_c.double(), a], 1), rank)
            error_sq += float(dropped_sq.sum())
        for i, (t, _) in enumerate(group):
            new[t.key_a], new[t.key_b] = a_new[i].float(), b_new[i].float()
    return Refactorised(dict(sorted(new.items())), math.sqrt(max(update_sq, 0.0)), math.sqrt(max(error_sq, 0.0)))


def exact(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A change [..., out, in] as factors of `rank` >= min(out, in) that multiply back to it exactly:
    the change itself on its wider side and an identity on the other (B = change, A = [I; 0] when
    in <= out; A = change, B = [I, 0] otherwise), zero-padded to `rank`, in float32. With R at least
    every target's min(out, in) the centre is the accumulated change in float32, the paper's
    master-weights precision, kept as an ordinary adapter (rank 576 at SmolLM2-135M); stored as the
    change alone (`stored_centre`), the identity and the padding being ~40% of these factors."""
    *batch, out_f, in_f = change.shape
    b_new = torch.zeros(*batch, out_f, rank, dtype=torch.float32)
    a_new = torch.zeros(*batch, rank, in_f, dtype=torch.float32)
    if in_f <= out_f:
        b_new[..., :in_f] = change
        a_new[..., :in_f, :] = torch.eye(in_f)
    else:
        a_new[..., :out_f, :] = change
        b_new[..., :out_f] = torch.eye(out_f)
    return b_new, a_new


def dense_of(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B @ A in float64, read off without a product when one side is exact's identity (the product
    would be exact too, at a cost of a weight-sized matmul per target per generation)."""
    out_f, in_f = b.shape[-2], a.shape[-1]
    if not b.any() or not a.any():  # generation 0's centre
        return torch.zeros(*b.shape[:-1], in_f, dtype=torch.float64)
    if in_f <= out_f and torch.equal(a[..., :in_f, :], torch.eye(in_f).expand_as(a[..., :in_f, :])) and not a[..., in_f:, :].any():
        return b[..., :in_f].double()
    if out_f < in_f and torch.equal(b[..., :out_f], torch.eye(out_f).expand_as(b[..., :out_f])) and not b[..., out_f:].any():
        return a[..., :out_f, :].double()
    return b.double() @ a.double()


def exact_change(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor | None:
    """The change [out, in] that `exact` made these factors of (b [out, R], a [R, in], float32), when
    exact(change, R) gives back these very bits; None for any other factors."""
    out_f, rank, in_f = b.shape[0], b.shape[1], a.shape[1]
    if rank < min(out_f, in_f) or b.dtype != torch.float32 or a.dtype != torch.float32:
        return None
    change = b[:, :in_f] if in_f <= out_f else a[:out_f]
    b_back, a_back = exact(change, rank)
    same = lambda x, y: torch.equal(x.view(torch.int32), y.contiguous().view(torch.int32))  # noqa: E731 - bits, so -0.0 is not 0.0
    return change if same(b_back, b) and same(a_back, a) else None


CHANGE_SUFFIX = ".change"  # a stored centre's key for an exact target's change: `<PEFT prefix><module path>.change`


def stored_centre(centre: LoRATensors) -> LoRATensors:
    """A centre as it is stored: each exact target (`exact`'s factors) as its change alone [out, in],
    without the identity and zero padding (about 40% of an exact centre's factors at SmolLM2, R 576),
    every other target's factors as they are. `centre_of_stored` gives back the same tensors."""
    out: LoRATensors = {}
    for key_a, a in centre.items():
        if not key_a.endswith("lora_A.weight"):
            continue
        key_b = key_a.replace("lora_A.weight", "lora_B.weight")
        change = exact_change(centre[key_b], a)
        if change is None:
            out[key_a], out[key_b] = a, centre[key_b]
        else:
            out[key_a.removesuffix(".lora_A.weight") + CHANGE_SUFFIX] = change
    return dict(sorted(out.items()))


def centre_of_stored(stored: LoRATensors, rank: int) -> LoRATensors:
    """`stored_centre`'s inverse at the centre's rank: each change as `exact`'s factors again."""
    out: LoRATensors = {}
    for key, value in stored.items():
        if not key.endswith(CHANGE_SUFFIX):
            out[key] = value
            continue
        if value.dim() != 2 or value.dtype != torch.float32 or min(value.shape) > rank:
            raise ValueError(f"{key}: a change of shape {tuple(value.shape)} ({value.dtype}) is not an exact target of a rank-{rank} centre")
        path = key.removesuffix(CHANGE_SUFFIX)
        out[f"{path}.lora_B.weight"], out[f"{path}.lora_A.weight"] = exact(value, rank)
    return dict(sorted(out.items()))


def truncate(u: torch.Tensor, v: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-`rank` approximation of u @ v (u [..., out, K], v [..., K, in], float64; leading
    dimensions batched) as (B [..., out, rank] = U S, A [..., rank, in] = V^T, orthonormal rows),
    zero-padded to `rank`, signs fixed (each A row's largest entry positive), and the squared
    Frobenius norm it drops [...]. Exact and cheap: QR of each side, an SVD of the K x K core."""
    batch, out_f, in_f = u.shape[:-2], u.shape[-2], v.shape[-1]
    b_new = torch.zeros(*batch, out_f, rank, dtype=torch.float64)
    a_new = torch.zeros(*batch, rank, in_f, dtype=torch.float64)
    if u.shape[-1] == 0:
        return b_new, a_new, torch.zeros(batch, dtype=torch.float64)
    qu, ru = torch.linalg.qr(u)  # [..., out, k1], [..., k1, K]
    qv, rv = torch.linalg.qr(v.transpose(-1, -2))  # [..., in, k2], [..., k2, K]
    p, s, qt = torch.linalg.svd(ru @ rv.transpose(-1, -2), full_matrices=False)  # core [..., k1, k2]
    # directions under the tolerance are dropped: LAPACK's choice among them is arbitrary
    s = torch.where(s > _RELATIVE_TOL * s[..., :1], s, torch.zeros_like(s))
    keep = min(rank, s.shape[-1])
    dropped = s[..., keep:].pow(2).sum(-1)
    left = qu @ p[..., :keep]  # [..., out, keep]
    right = qt[..., :keep, :] @ qv.transpose(-1, -2)  # [..., keep, in]
    idx = right.abs().argmax(-1, keepdim=True)
    flip = torch.where(right.gather(-1, idx) < 0, -1.0, 1.0).to(torch.float64)  # [..., keep, 1]
    b_new[..., :keep] = left * (s[..., :keep, None] * flip).transpose(-1, -2)
    a_new[..., :keep, :] = torch.where(s[..., :keep, None] > 0, right * flip, torch.zeros_like(right))
    return b_new, a_new, dropped


# --- the search space (es_core/search_space.py's interface) --------------------------------------


def targets_of(centre: LoRATensors) -> list[LoRATarget]:
    """The targets a centre's tensors name (PEFT keys), with their shapes."""
    out = []
    for key, value in centre.items():
        m = _KEY_RE.match(key)
        if m and m.group("factor") == "A":
            b = centre[key.replace("lora_A.weight", "lora_B.weight")]
            out.append(LoRATarget(m.group("path"), int(m.group("layer")), m.group("module"), int(value.shape[1]), int(b.shape[0])))
    return out


@dataclass(frozen=True)
class WeightsSpace:
    """ES over the weights (module docstring): members rank-`noise_rank` perturbations, the centre a
    rank-`centre_rank` adapter; `scales`: (lora_A key, s_W) of each target when sigma is relative to
    the weights' RMS (empty: absolute). A plain value: part of the plan, so of every cache key."""

    noise_rank: int
    centre_rank: int
    scales: tuple[tuple[str, float], ...] = ()

    def layout(self, centre: LoRATensors) -> WeightsLayout:
        targets = targets_of(centre)
        by_key = dict(self.scales)
        if by_key and set(by_key) != {t.key_a for t in targets}:
            raise ValueError("the sigma scales name other targets than the centre's")
        return weights_layout(targets, self.noise_rank, self.centre_rank, [by_key.get(t.key_a, 1.0) for t in targets])

    def noise_layout(self, centre: LoRATensors, perturb: str = "both") -> NoiseLayout:
        return self.layout(centre).noise

    def draw(self, plan: PopulationPlan, layout: NoiseLayout) -> DrawnPopulation:
        return DrawnPopulation(plan, draw_population_noise(layout, plan.members))

    def members(self, centre: LoRATensors, population: DrawnPopulation) -> StackedLoRA:
        layout = self._checked(centre, population)
        return member_factors(layout, population.noise, population.plan.members, population.plan.sigma)

    def shared(self, centre: LoRATensors) -> LoRATensors:
        return centre

    # a member's record names its centre and what regenerates its own factors from the run's noise (a
    # few hundred bytes): the whole member (rank R + r) repeated the centre in every file (79 MB a
    # member at SmolLM2, R 64), its own factors alone were still 1.2 MB at every layer
    records_are_served = False

    def record(self, centre, centre_spec, centre_sha256, plan, index, members):
        scales = tuple(s for _, s in sorted(self.scales))  # the layout's order: its targets sorted by key
        member = plan.members[index]
        return {MEMBER_FILE: MemberRecord(centre_sha256, member.seed, member.sign, plan.sigma, self.noise_rank, scales).to_bytes()}

    def adapter(self, centre: LoRATensors, centre_spec: AdapterSpec, members: StackedLoRA, index: int) -> tuple[LoRATensors, AdapterSpec]:
        return member_adapter(centre, members.member(index)), spec_of_rank(centre_spec, centre_spec.rank + self.noise_rank)

    def tell(self, state: ESState, population: DrawnPopulation, weights: torch.Tensor, optimiser) -> tuple[ESState, dict]:
        from es_core.optimisers import SGD

        if not isinstance(optimiser, SGD):
            raise ValueError(f"weights space steps with SGD only (got {type(optimiser).__name__})")
        layout = self._checked(state.centre, population)
        lr = optimiser.learning_rate
        result = tell(state.centre, layout, population.noise, population.plan.members, weights.tolist(), lr)
        metrics = {"grad_norm": result.update_norm / lr, "update_norm": result.update_norm, "truncation_kept": result.truncation_kept}
        return ESState(result.centre, state.generation + 1), metrics

    def _checked(self, centre: LoRATensors, population: DrawnPopulation) -> WeightsLayout:
        layout = self.layout(centre)
        if population.noise.layout != layout.noise:
            raise ValueError("the population was drawn for another layout than this centre's")
        return layout


MEMBER_FILE = "es_member.json"  # a weights-space member's artifact: its record (MemberRecord)


@dataclass(frozen=True)
class MemberRecord:
    """What a weights-space member's artifact holds: no tensors, only what regenerates its own factors
    bit for bit (`own_factors`) from the run's counter-based noise (seeding.py): the centre it
    perturbs (its targets lay the noise out), its seed and sign, sigma, the noise rank r and the
    sigma scales s_W of the centre's targets in sorted key order (none when sigma is absolute). The
    member is that centre plus these factors (`member_adapter` joins them, rank R + r)."""

    centre_sha256: str
    seed: int
    sign: int
    sigma: float
    noise_rank: int
    sigma_scales: tuple[float, ...] = ()
    noise_scheme: str = NOISE_SCHEME

    def to_bytes(self) -> bytes:
        # floats as Python writes them (shortest repr): they read back as the same doubles
        fields = {"space": "weights", "centre_sha256": self.centre_sha256, "seed": self.seed, "sign": self.sign, "sigma": self.sigma,
                  "noise_rank": self.noise_rank, "sigma_scales": list(self.sigma_scales), "noise_scheme": self.noise_scheme}
        return (json.dumps(fields, sort_keys=True, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "MemberRecord":
        """A record as `to_bytes` wrote it; anything else is a ValueError naming `where`."""
        fields = _member_json(data, where)
        try:
            return cls(str(fields["centre_sha256"]), int(fields["seed"]), int(fields["sign"]), float(fields["sigma"]), int(fields["noise_rank"]),
                       tuple(float(s) for s in fields["sigma_scales"]), str(fields["noise_scheme"]))
        except KeyError as exc:
            raise ValueError(f"{where}: a weights-space member record needs {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: not a weights-space member record ({exc})") from None


def record_centre_sha256(data: bytes, where: str) -> str:
    """The centre a member's es_member.json names (a record, or the factor files' note before it)."""
    centre = _member_json(data, where).get("centre_sha256")
    if not isinstance(centre, str):
        raise ValueError(f"{where}: names no centre_sha256")
    return centre


def _member_json(data: bytes, where: str) -> dict:
    try:
        fields = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(fields, dict) or fields.get("space") != "weights":
        raise ValueError(f"{where}: not a weights-space member record (no \"space\": \"weights\")")
    return fields


def own_factors(record: MemberRecord, centre: LoRATensors) -> LoRATensors:
    """A member's own rank-r factors from its record and its centre (the record's `centre_sha256`):
    its seed's noise stream laid out over the centre's targets, as `member_factors` built it in its
    generation (one seed's stream does not depend on the others drawn beside it), so bit for bit."""
    if record.noise_scheme != NOISE_SCHEME:
        raise ValueError(f"the member record draws its noise by {record.noise_scheme}, this code by {NOISE_SCHEME}: it cannot be regenerated here")
    targets = sorted(targets_of(centre), key=lambda t: t.key_a)
    if record.sigma_scales and len(record.sigma_scales) != len(targets):
        raise ValueError(f"the member record has {len(record.sigma_scales)} sigma scales, its centre {len(targets)} targets")
    centre_rank = next(v.shape[0] for k, v in centre.items() if k.endswith("lora_A.weight"))
    layout = weights_layout(targets, record.noise_rank, centre_rank, list(record.sigma_scales) or None)
    member = Member(0, record.seed, record.sign)
    return member_factors(layout, draw_population_noise(layout.noise, [member]), [member], record.sigma).member(0)


def factor_record_files(own: LoRATensors, centre_spec: AdapterSpec, noise_rank: int, centre_sha256: str) -> dict[str, bytes]:
    """A member's artifact as it was before `MemberRecord`: its own rank-r factors as a PEFT folder
    and es_member.json naming its centre (1.2 MB at every layer of SmolLM2). Ledgers of that time
    name these: replay rebuilds them to compare, artifacts.checkpoints.adapter_folder still serves them."""
    note = (json.dumps({"space": "weights", "centre_sha256": centre_sha256}, sort_keys=True) + "\n").encode()
    return {**adapter_files(own, spec_of_rank(centre_spec, noise_rank)), MEMBER_FILE: note}


def zero_centre(targets: Sequence[LoRATarget], centre_rank: int) -> LoRATensors:
    """Generation 0's centre in weights space: no change yet (A = B = 0, rank R)."""
    return weights_layout(targets, 1, centre_rank).template(centre_rank)


def weights_space_of(noise_rank: int, centre_rank: int, sigma_scale: str, model_path, targets: Sequence[LoRATarget]) -> WeightsSpace:
    """The run's space from its settings and the model its ES starts from (`sigma_scale` weight_rms:
    each target's RMS, read from the model folder's safetensors)."""
    if sigma_scale == "absolute":
        return WeightsSpace(int(noise_rank), int(centre_rank))
    return WeightsSpace(int(noise_rank), int(centre_rank), tuple(zip((t.key_a for t in targets), folder_weight_rms(model_path, targets))))


def folder_weight_rms(model_path, targets: Sequence[LoRATarget]) -> list[float]:
    """weight_rms of a local HF folder's tensors, read one at a time (no model is built)."""
    from pathlib import Path

    from safetensors import safe_open

    wanted = {f"{t.path}.weight" for t in targets}
    found: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in wanted:
                    found[name] = f.get_tensor(name)
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"{model_path}: no weight {missing[0]} in its safetensors files ({len(missing)} missing)")
    return weight_rms(found, targets)
