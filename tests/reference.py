"""Plain-loop references written straight from the papers' formulas: the oracle for the vectorised ops.

Nothing here is vectorised: Python floats and nested lists, loops over groups i and tokens t.  Inputs are
lists (convert tensors with ``.tolist()``); a NaN reward means "missing"; masked tokens are skipped, so
whatever they hold never matters.  Loss references live in ``reference_losses.py``.
"""

from __future__ import annotations

import math

# ----------------------------------------------------------------------------- advantages (methods.md §6)


def _groups(rewards: list[float], group_size: int) -> list[list[float]]:
    assert len(rewards) % group_size == 0
    return [rewards[k : k + group_size] for k in range(0, len(rewards), group_size)]


def _valid(group: list[float]) -> list[float]:
    return [r for r in group if not math.isnan(r)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float], unbiased: bool) -> float:
    m = _mean(values)
    n = len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1 if unbiased else n))


def _no_signal(valid: list[float]) -> bool:
    return len(valid) < 2 or max(valid) == min(valid)


def grpo_advantages(rewards: list[float], group_size: int, eps: float = 1e-6, unbiased: bool = True) -> list[float]:
    """Â_i = (R_i − mean_g) / (std_g + ε) over the valid members; 0 for NaN and for no-signal groups."""
    out = []
    for group in _groups(rewards, group_size):
        valid = _valid(group)
        for r in group:
            if math.isnan(r) or _no_signal(valid):
                out.append(0.0)
            else:
                out.append((r - _mean(valid)) / (_std(valid, unbiased) + eps))
    return out


def dr_grpo_advantages(rewards: list[float], group_size: int) -> list[float]:
    """Â_i = R_i − mean_g."""
    out = []
    for group in _groups(rewards, group_size):
        valid = _valid(group)
        for r in group:
            out.append(0.0 if math.isnan(r) or _no_signal(valid) else r - _mean(valid))
    return out


def rloo_advantages(rewards: list[float], group_size: int) -> list[float]:
    """Â_i = R_i − mean_{j ≠ i} R_j over the valid members j."""
    out = []
    for group in _groups(rewards, group_size):
        valid = _valid(group)
        for i, r in enumerate(group):
            if math.isnan(r) or _no_signal(valid):
                out.append(0.0)
                continue
            others = [s for j, s in enumerate(group) if j != i and not math.isnan(s)]
            out.append(r - _mean(others))
    return out


def batch_std_advantages(
    rewards: list[float], group_size: int, eps: float = 1e-6, unbiased: bool = True, std_of: str = "rewards"
) -> list[float]:
    """Â_i = (R_i − mean_g) / (std over the batch of R, or of R − mean_g, + ε)."""
    groups = _groups(rewards, group_size)
    if std_of == "rewards":
        pool = _valid(rewards)
    else:
        pool = [r - _mean(_valid(g)) for g in groups for r in g if not math.isnan(r)]
    batch_std = _std(pool, unbiased) if len(pool) > (1 if unbiased else 0) else 0.0
    out = []
    for group in groups:
        valid = _valid(group)
        for r in group:
            if math.isnan(r) or _no_signal(valid):
                out.append(0.0)
            else:
                out.append((r - _mean(valid)) / (batch_std + eps))
    return out


def _lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def mc_grpo_advantages(
    rewards: list[float],
    group_size: int,
    mad_eps: float = 1e-3,
    zero_mad_scale: float | None = None,
    zero_atol: float = 1e-6,
    rescale_nonzero: bool = True,
) -> tuple[list[float], list[bool]]:
    """MC-GRPO (arXiv 2601.22582): median baseline, MAD scale, pivot out, non-zero rescale. -> (Â, keep)."""
    adv: list[float] = []
    keep: list[bool] = []
    for group in _groups(rewards, group_size):
        valid = _valid(group)
        if not valid:
            adv += [0.0] * len(group)
            keep += [False] * len(group)
            continue
        median = _lower_median(valid)
        mad = _lower_median([abs(r - median) for r in valid])
        scale = zero_mad_scale if (zero_mad_scale is not None and mad == 0) else mad + mad_eps
        group_adv = [0.0 if math.isnan(r) else (r - median) / scale for r in group]
        if rescale_nonzero:
            nonzero = [not math.isnan(r) and abs(a) > zero_atol for r, a in zip(group, group_adv)]
            count = sum(nonzero)
            for i in range(len(group)):
                if nonzero[i]:
                    group_adv[i] *= len(valid) / count
        if _no_signal(valid):
            group_adv = [0.0] * len(group)
        pivot = next(i for i, r in enumerate(group) if not math.isnan(r) and r == median)
        adv += group_adv
        keep += [not math.isnan(r) and i != pivot for i, r in enumerate(group)]
    return adv, keep


def bnpo_advantages(
    rewards: list[float],
    group_size: int,
    reward_min: float = 0.0,
    reward_max: float = 1.0,
    max_inverse_density: float = 1e6,
    var_floor: float | None = None,
) -> tuple[list[float], float, float]:
    """BNPO (arXiv 2506.02864): Beta(α, β) fitted by moments to the pass rates; Â = (s − p) / f(p). -> (Â, α, β)."""
    scores = [(r - reward_min) / (reward_max - reward_min) for r in rewards]
    groups = _groups(scores, group_size)
    rates = [_mean(_valid(g)) if _valid(g) else None for g in groups]
    fit = [p for p in rates if p is not None]
    p_bar = _mean(fit)
    var = sum((p - p_bar) ** 2 for p in fit) / (len(fit) - 1) if len(fit) > 1 else 0.0
    if var_floor is not None:
        var = max(var, var_floor)
    if var <= 0:
        alpha = beta = 1.0
    else:
        a = (p_bar * (1 - p_bar) / var - 1) * p_bar
        b = (p_bar * (1 - p_bar) / var - 1) * (1 - p_bar)
        alpha, beta = max(1.0, 1 + a / 3), max(1.0, 1 + b / 3)
    log_b = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    out = []
    for group, p in zip(groups, rates):
        valid = _valid(group)
        for s in group:
            if math.isnan(s) or _no_signal(valid):
                out.append(0.0)
                continue
            q = min(max(p, 0.0), 1.0)
            term_a = 0.0 if alpha == 1 else (alpha - 1) * (math.log(q) if q > 0 else -math.inf)
            term_b = 0.0 if beta == 1 else (beta - 1) * (math.log(1 - q) if q < 1 else -math.inf)
            log_density = term_a + term_b - log_b
            inverse = math.exp(-log_density) if -log_density < 700 else math.inf
            out.append(min(inverse, max_inverse_density) * (s - p))
    return out, alpha, beta


# ----------------------------------------------------------------------------- aggregation (methods.md §1)


def token_mean(loss: list[list[float]], mask: list[list[bool]], num_tokens: float) -> float:
    total = 0.0
    for i in range(len(loss)):
        for t in range(len(loss[i])):
            if mask[i][t]:
                total += loss[i][t]
    return total / num_tokens


def seq_mean_token_mean(loss: list[list[float]], mask: list[list[bool]], num_seqs: float) -> float:
    total = 0.0
    for i in range(len(loss)):
        row_sum, row_len = 0.0, 0
        for t in range(len(loss[i])):
            if mask[i][t]:
                row_sum += loss[i][t]
                row_len += 1
        if row_len:
            total += row_sum / row_len
    return total / num_seqs


def seq_mean_token_sum(loss: list[list[float]], mask: list[list[bool]], num_seqs: float) -> float:
    return token_mean(loss, mask, 1.0) / num_seqs


def constant_norm(loss: list[list[float]], mask: list[list[bool]], num_seqs: float, max_len: float) -> float:
    return token_mean(loss, mask, 1.0) / (num_seqs * max_len)


# ----------------------------------------------------------------------------- KL estimators (Schulman 2020)


def kl_k1(logprob: float, ref_logprob: float) -> float:
    return logprob - ref_logprob


def kl_k2(logprob: float, ref_logprob: float) -> float:
    return 0.5 * (logprob - ref_logprob) ** 2


def kl_k3(logprob: float, ref_logprob: float, log_ratio_clamp: float = 20.0, kl_clamp: float = 10.0) -> float:
    log_ratio = min(max(ref_logprob - logprob, -log_ratio_clamp), log_ratio_clamp)
    value = math.exp(log_ratio) - log_ratio - 1.0
    return min(max(value, -kl_clamp), kl_clamp)


def per_token(fn, logprobs: list[list[float]], ref_logprobs: list[list[float]], mask: list[list[bool]], **hp):
    """Apply a per-token reference over (B, T) lists, 0 where masked."""
    out = []
    for i in range(len(logprobs)):
        row = []
        for t in range(len(logprobs[i])):
            row.append(fn(logprobs[i][t], ref_logprobs[i][t], **hp) if mask[i][t] else 0.0)
        out.append(row)
    return out


# ----------------------------------------------------------------------------- masked reductions (ops/masking.py)


def masked_values(x: list[list[float]], mask: list[list[bool]]) -> list[float]:
    """The valid entries of a (B, T) list, row by row."""
    out = []
    for i in range(len(x)):
        for t in range(len(x[i])):
            if mask[i][t]:
                out.append(x[i][t])
    return out


def masked_var(values: list[float], unbiased: bool = True) -> float:
    n = len(values)
    if n - (1 if unbiased else 0) <= 0:
        return 0.0
    m = sum(values) / n
    return sum((v - m) ** 2 for v in values) / (n - 1 if unbiased else n)


def masked_whiten(x: list[list[float]], mask: list[list[bool]], shift_mean: bool = True, eps: float = 1e-8):
    values = masked_values(x, mask)
    mean = sum(values) / max(len(values), 1)
    scale = 1.0 / math.sqrt(masked_var(values) + eps)
    out = []
    for i in range(len(x)):
        row = []
        for t in range(len(x[i])):
            if mask[i][t]:
                row.append(((x[i][t] - mean) if shift_mean else x[i][t]) * scale)
            else:
                row.append(0.0)
        out.append(row)
    return out


def response_mask_from_eos(completion_ids: list[list[int]], eos_ids: set[int]) -> tuple[list[list[bool]], list[bool]]:
    """True up to and including the first EOS of each row; truncated = the row has no EOS."""
    masks, truncated = [], []
    for row in completion_ids:
        seen_eos, mask = False, []
        for token in row:
            mask.append(not seen_eos)
            if token in eos_ids:
                seen_eos = True
        masks.append(mask)
        truncated.append(not seen_eos)
    return masks, truncated
