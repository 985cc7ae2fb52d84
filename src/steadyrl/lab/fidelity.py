"""Gradient fidelity: the trainer's expected gradient against the true gradient of J_seq, on an enumerated set.

The Formulation paper (Zheng et al., arXiv 2512.01374, §2-3) optimises the sequence objective
J_seq(θ) = E_x E_{y∼π_θ(·|x)}[R(x, y)] with a token-level surrogate whose gradient equals ∇J_seq only to first
order in the train-inference gap π_old/μ and the staleness π_θ/π_old. On an enumerated set S_x (lab/
enumeration.py) both sides are sums, not samples:

    true       ∇J_S(θ) = (1/P) Σ_x Σ_{y∈S_x} R(x, y) ∇π_θ(y|x)                       (autograd of the sum)
    training   g(θ)    = −E[∇ L_trainer(θ; one mini-batch)]  over batches drawn from μ

For group-mean advantages (dr_grpo, A_i = R_i − mean_j R_j over a group of G) and a binary reward, E[A_i | y_i]
= ((G−1)/G)(R(y_i) − p_x) with p_x = E_μ[R | x], and A_i ≠ 0 has the sign of R(y_i) − p_x. Every loss used here
(reinforce, reinforce_is, ppo_clip, with token_tis) is linear in Â with masks that read only its sign, and every
aggregation used (seq_mean_token_sum / _mean) is a per-sequence sum, so

    g(θ) = −∇ L_trainer(θ; every y ∈ S, Â(y) = ((G−1)/G)(R(y) − p_x) μ̃(y|x), sequence normaliser P)

exactly, where μ̃ is μ renormalised over S_x. One call of the trainer's loss on the enumerated rows gives the
expectation with no sampling noise; ``sampled_batch`` draws real batches for the noise floor.

On-policy (μ = π_old = π_θ, N = 1), g = ((G−1)/G) ∇J_S − ((G−1)/G) Σ_x p_x ∇mass_S(x)/P: cosine 1 up to
the enumeration's missing mass. ``compare`` reports the cosine, the relative error against c·∇J with the scale
c an unbiased estimator has (``reference_scale``), and the norm ratio.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadyrl.lab.enumeration import Enumerated
from steadyrl.ops.masking import masked_fill_zero, masked_sum
from steadyrl.train.batch import ScoredBatch
from steadyrl.train.forward import model_inputs, policy_forward


@torch.no_grad()
def trainer_token_logprobs(model: torch.nn.Module, enum: Enumerated, temperature: float = 1.0, chunk: int = 1024) -> Tensor:
    """(R, T) log π(y_t) as the trainer scores it (``policy_forward``), 0 at padding."""
    out = []
    rollout = enum.rollout()
    for rows in torch.arange(enum.num_rows).split(chunk):
        out.append(policy_forward(model, rollout.select(rows), temperature=temperature, compute_entropy=False).logprobs)
    return masked_fill_zero(torch.cat(out).float(), enum.response_mask)


@torch.no_grad()
def sampler_token_logprobs(sampler: torch.nn.Module, enum: Enumerated, temperature: float = 1.0, chunk: int = 1024) -> Tensor:
    """(R, T) log μ(y_t) as a sampler computes it: its own full forward (its dtype, its hooks), then
    log_softmax(logits.float() / τ), the computation of the rollout backends' recorders."""
    out = []
    rollout = enum.rollout()
    for rows in torch.arange(enum.num_rows).split(chunk):
        part = rollout.select(rows)
        ids, attn, pos = model_inputs(part)
        logits = sampler(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        tp = part.prompt_ids.shape[1]
        lp = torch.log_softmax(logits[:, tp - 1 : -1].float() / temperature, dim=-1)
        out.append(lp.gather(-1, part.completion_ids.unsqueeze(-1)).squeeze(-1))
    return masked_fill_zero(torch.cat(out), enum.response_mask)


def sequence_logprob(token_logprobs: Tensor, mask: Tensor) -> Tensor:  # (R, T) -> (R,)
    return masked_sum(token_logprobs.double(), mask, dim=1)


def conditional_probs(seq_logprob: Tensor, prompt_index: Tensor, num_prompts: int) -> Tensor:
    """μ̃(y|x) = μ(y|x) / Σ_{y'∈S_x} μ(y'|x): the distribution renormalised over each prompt's kept rows."""
    weight = seq_logprob.double().exp()
    total = torch.zeros(num_prompts, dtype=torch.float64).index_add_(0, prompt_index, weight)
    return weight / total[prompt_index]


def success_rate(probs: Tensor, rewards: Tensor, prompt_index: Tensor, num_prompts: int) -> Tensor:  # (P,)
    return torch.zeros(num_prompts, dtype=torch.float64).index_add_(0, prompt_index, probs * rewards.double())


def expected_batch(
    enum: Enumerated,
    rewards: Tensor,  # (R,) binary
    mu_token_logprobs: Tensor,  # (R, T) log μ
    old_token_logprobs: Tensor | None,  # (R, T) log π_old, None = on-policy (N = 1, as the trainer)
    group_size: int,
) -> ScoredBatch:
    """The enumerated rows as one ScoredBatch whose loss is the expected loss (module docstring)."""
    if not torch.all((rewards == 0) | (rewards == 1)):
        raise ValueError("the exact expectation needs a binary reward (the sign of Â must be that of R − p).")
    mu = conditional_probs(sequence_logprob(mu_token_logprobs, enum.response_mask), enum.prompt_index, enum.num_prompts)
    p = success_rate(mu, rewards, enum.prompt_index, enum.num_prompts)
    factor = (group_size - 1) / group_size
    adv_row = (factor * (rewards.double() - p[enum.prompt_index]) * mu).float()
    advantages = masked_fill_zero(adv_row[:, None].expand_as(mu_token_logprobs).clone(), enum.response_mask)
    return ScoredBatch(
        rollout=enum.rollout(mu_token_logprobs),
        rewards=rewards.float(),
        advantages=advantages,
        sample_mask=torch.ones(enum.num_rows, dtype=torch.bool),
        old_logprobs=old_token_logprobs,
    )


def reference_scale(enum: Enumerated, mu_token_logprobs: Tensor, group_size: int, length_normalised: bool) -> float:
    """c with E[g] = c ∇J for an unbiased on-policy estimator: (G−1)/G, times E_μ̃[1/|y|] (averaged over the
    prompts) when each sequence's loss is divided by its length."""
    factor = (group_size - 1) / group_size
    if not length_normalised:
        return factor
    mu = conditional_probs(sequence_logprob(mu_token_logprobs, enum.response_mask), enum.prompt_index, enum.num_prompts)
    inv_len = 1.0 / enum.response_mask.sum(1).double().clamp(min=1)
    return factor * float((mu * inv_len).sum() / enum.num_prompts)


def true_gradient(model: torch.nn.Module, enum: Enumerated, rewards: Tensor, temperature: float = 1.0) -> tuple[Tensor, float, Tensor]:
    """(flat ∇J_S(θ), J_S(θ), mass of S per prompt under π_θ): J_S = (1/P) Σ_x Σ_{y∈S_x} R(y) π_θ(y|x).

    Only rows with R ≠ 0 enter the gradient; the mass needs every row (a no-grad forward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = (rewards != 0).nonzero().squeeze(-1)
    mass = torch.zeros(enum.num_prompts, dtype=torch.float64).index_add_(
        0, enum.prompt_index, sequence_logprob(trainer_token_logprobs(model, enum, temperature), enum.response_mask).exp()
    )
    if rows.numel() == 0:
        return torch.zeros(sum(p.numel() for p in params)), 0.0, mass
    part = enum.select(rows)
    lp = policy_forward(model, part.rollout(), temperature=temperature, compute_entropy=False).logprobs
    seq = masked_sum(masked_fill_zero(lp, part.response_mask), part.response_mask, dim=1)
    objective = (rewards[rows].float() * seq.exp()).sum() / enum.num_prompts
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])
    return flat, float(objective.detach()), mass


def compare(train: Tensor, true: Tensor, scale: float) -> dict[str, float]:
    """cosine(g, ∇J); relative error ‖g − c∇J‖ / ‖c∇J‖; norm ratio ‖g‖ / ‖c∇J‖ (c = ``scale``)."""
    ref = scale * true.double()
    g = train.double()
    ref_norm = ref.norm().clamp(min=1e-30)
    return {
        "cos": float(torch.nn.functional.cosine_similarity(g, ref, dim=0)),
        "rel_err": float((g - ref).norm() / ref_norm),
        "norm_ratio": float(g.norm() / ref_norm),
    }


def sampled_batch(
    enum: Enumerated,
    rewards: Tensor,
    mu_token_logprobs: Tensor,
    old_token_logprobs: Tensor | None,
    *,
    prompts: Tensor,  # (n,) long, prompt indices (with repeats) of the batch
    group_size: int,
    advantage_fn,
    generator: torch.Generator,
) -> ScoredBatch:
    """A real batch: G completions per listed prompt drawn from μ̃ over its kept rows, advantages from the
    trainer's advantage function (groups contiguous)."""
    mu = conditional_probs(sequence_logprob(mu_token_logprobs, enum.response_mask), enum.prompt_index, enum.num_prompts)
    picks = []
    for p in prompts.tolist():
        rows = (enum.prompt_index == p).nonzero().squeeze(-1)
        draw = torch.multinomial(mu[rows].float(), group_size, replacement=True, generator=generator)
        picks.append(rows[draw])
    index = torch.cat(picks)
    part = enum.select(index)
    r = rewards[index].float()
    adv = advantage_fn(r, group_size)
    advantages = masked_fill_zero(adv.advantages.float()[:, None].expand(len(index), part.response_mask.shape[1]).clone(), part.response_mask)
    return ScoredBatch(
        rollout=part.rollout(mu_token_logprobs[index]),
        rewards=r,
        advantages=advantages,
        sample_mask=adv.sample_mask,
        old_logprobs=None if old_token_logprobs is None else old_token_logprobs[index],
    )


def sequence_kl(old_token_logprobs: Tensor, new_token_logprobs: Tensor, enum: Enumerated) -> float:
    """Mean over prompts of KL(π_old ‖ π_new) over the kept rows, with π_old renormalised over S_x (exact
    up to the missing mass): Σ_y π̃_old(y) (log π_old(y) − log π_new(y))."""
    old_seq = sequence_logprob(old_token_logprobs, enum.response_mask)
    new_seq = sequence_logprob(new_token_logprobs, enum.response_mask)
    w = conditional_probs(old_seq, enum.prompt_index, enum.num_prompts)
    return float((w * (old_seq - new_seq)).sum() / enum.num_prompts)


__all__ = [
    "compare",
    "conditional_probs",
    "expected_batch",
    "reference_scale",
    "sampled_batch",
    "sampler_token_logprobs",
    "sequence_kl",
    "success_rate",
    "trainer_token_logprobs",
    "true_gradient",
]
