"""Plain-loop references for the adopted methods (ops/losses_adopted.py, token_masks.py, advantages_multi.py,
kl_is.py), written from the formulas in the papers / framework docs with Python floats.

Losses return (loss, grad) as two (B, T) float64 tensors, grad = ∂(Σ loss)/∂ log π_θ derived by hand.
Masks return a (B, T) bool keep-mask; advantages a list of floats (or a (B, T) nested list for OTB).
No shared code with the library.
"""

from __future__ import annotations

import math

import torch

from reference_losses import _lists, _out, _ppo_token, _zeros


def sapo(logp, old, adv, mask, tau_pos, tau_neg):
    lp, lo, A, M = _lists(logp, old, adv, mask)
    loss, grad = _zeros(len(lp), len(lp[0]))
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if not M[i][t]:
                continue
            r = math.exp(lp[i][t] - lo[i][t])
            tau = tau_pos if A[i][t] > 0 else tau_neg
            s = 1.0 / (1.0 + math.exp(-tau * (r - 1.0)))
            loss[i][t] = -s * 4.0 / tau * A[i][t]
            grad[i][t] = -4.0 * A[i][t] * s * (1.0 - s) * r  # d/dlogπ: f'(r)·r, f'(r) = 4σ(1 − σ)
    return _out(loss, grad)


def gmpo(logp, old, adv, mask, eps_low, eps_high):
    lp, lo, A, M = _lists(logp, old, adv, mask)
    loss, grad = _zeros(len(lp), len(lp[0]))
    for i in range(len(lp)):
        ts = [t for t in range(len(lp[0])) if M[i][t]]
        if not ts:
            continue
        clipped, free = [], []
        for t in ts:
            x = lp[i][t] - lo[i][t]
            if A[i][t] > 0 and x > eps_high:
                clipped.append(eps_high), free.append(False)
            elif A[i][t] < 0 and x < -eps_low:
                clipped.append(-eps_low), free.append(False)
            elif A[i][t] == 0:
                clipped.append(0.0), free.append(False)
            else:
                clipped.append(x), free.append(True)
        n = len(ts)
        s = math.exp(sum(clipped) / n)
        a_bar = sum(A[i][t] for t in ts) / n
        for t, f in zip(ts, free):
            loss[i][t] = -a_bar * s
            # Σ_t' ℓ = n·L: ∂/∂log π_t = n · (−Ā) · s / n on unclipped tokens
            grad[i][t] = -a_bar * s if f else 0.0
    return _out(loss, grad)


def dro(logp, old, adv, mask, beta):
    lp, lo, A, M = _lists(logp, old, adv, mask)
    loss, grad = _zeros(len(lp), len(lp[0]))
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if M[i][t]:
                d = lp[i][t] - lo[i][t]
                loss[i][t] = -(A[i][t] * lp[i][t] - 0.5 * beta * d * d)
                grad[i][t] = -A[i][t] + beta * d
    return _out(loss, grad)


def kimi_dppo(logp, mu, adv, mask, low, high, adv_tau, kl_tau):
    lp, lm, A, M = _lists(logp, mu, adv, mask)
    loss, grad = _zeros(len(lp), len(lp[0]))
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if not M[i][t]:
                continue
            d = lp[i][t] - lm[i][t]
            rho = math.exp(d)
            dp = math.exp(lp[i][t]) - math.exp(lm[i][t])
            masked = dp > high if A[i][t] > 0 else dp < -low
            pg = 0.0 if masked else -adv_tau * A[i][t] * rho
            loss[i][t] = pg + kl_tau * d * d
            grad[i][t] = pg + 2.0 * kl_tau * d  # ∂ρ/∂logπ = ρ
    return _out(loss, grad)


def dcpo_bounds(q, eps_low, eps_high, cap):
    lower = 0.5 + 0.5 * math.sqrt(max(1.0 - 4.0 * eps_low / q, 0.0))
    upper = min(0.5 + 0.5 * math.sqrt(1.0 + 4.0 * eps_high / q), cap)
    return lower, upper


def dcpo(logp, old, adv, mask, eps_low, eps_high, dual, cap):
    lp, lo, A, M = _lists(logp, old, adv, mask)
    loss, grad = _zeros(len(lp), len(lp[0]))
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if M[i][t]:
                lower, upper = dcpo_bounds(math.exp(lo[i][t]), eps_low, eps_high, cap)
                r = math.exp(lp[i][t] - lo[i][t])
                loss[i][t], grad[i][t] = _ppo_token(r, A[i][t], lower, upper, dual)
    return _out(loss, grad)


def high_entropy_keep(entropy, mask, rho):
    H, M = _lists(entropy, mask)
    values = sorted(H[i][t] for i in range(len(H)) for t in range(len(H[0])) if M[i][t])
    if not values:
        return torch.zeros(len(H), len(H[0]), dtype=torch.bool)
    pos = (1.0 - rho) * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    threshold = values[lo] + (values[hi] - values[lo]) * (pos - lo)
    return torch.tensor([[bool(M[i][t]) and H[i][t] >= threshold for t in range(len(H[0]))] for i in range(len(H))])


def m2po_keep(anchor, mu, mask, threshold):
    la, lm, M = _lists(anchor, mu, mask)
    tokens = [((la[i][t] - lm[i][t]) ** 2, i, t) for i in range(len(la)) for t in range(len(la[0])) if M[i][t]]
    order = sorted(range(len(tokens)), key=lambda j: (-tokens[j][0], j))  # largest first, ties by position
    n = len(order)
    k = n - 1 if n else 0
    for drop in range(n):
        rest = [tokens[j][0] for j in order[drop:]]
        if sum(rest) / len(rest) < threshold:
            k = drop
            break
    keep = [[bool(M[i][t]) for t in range(len(la[0]))] for i in range(len(la))]
    for j in order[:k]:
        keep[tokens[j][1]][tokens[j][2]] = False
    return torch.tensor(keep)


# ---------------------------------------------------------------------------------------------- advantages


def _groups(values, group_size):
    return [values[g : g + group_size] for g in range(0, len(values), group_size)]


def _stats(xs, unbiased=True):
    """(mean, std) of the non-NaN members, std 0 for fewer than two."""
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return 0.0, 0.0
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    d = len(xs) - 1 if unbiased else len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / d)


def gdpo(rewards, group_size, weights, eps, batch_norm, batch_eps):
    """rewards: list of per-completion lists (K components)."""
    B, K = len(rewards), len(rewards[0])
    score = [0.0] * B
    signal_group = [False] * (B // group_size)
    for k in range(K):
        col = [rewards[i][k] for i in range(B)]
        for g, members in enumerate(_groups(col, group_size)):
            valid = [x for x in members if not math.isnan(x)]
            if len(valid) < 2 or max(valid) == min(valid):
                continue
            signal_group[g] = True
            m, s = _stats(members)
            for j, x in enumerate(members):
                if not math.isnan(x):
                    score[g * group_size + j] += weights[k] * (x - m) / (s + eps)
    valid = [not all(math.isnan(x) for x in rewards[i]) for i in range(B)]
    if batch_norm != "none":
        m, s = _stats([score[i] if valid[i] else math.nan for i in range(B)])
        scale = s + batch_eps if batch_norm == "std" else math.sqrt(s * s + batch_eps)
        score = [(x - m) / scale for x in score]
    return [score[i] if valid[i] and signal_group[i // group_size] else 0.0 for i in range(B)]


def maxrl(rewards, group_size, eps, divide):
    out = []
    for members in _groups(rewards, group_size):
        valid = [x for x in members if not math.isnan(x)]
        m = sum(valid) / len(valid) if valid else 0.0
        flat = len(valid) < 2 or max(valid) == min(valid)
        for x in members:
            if math.isnan(x) or flat or m == 0:
                out.append(0.0)
            else:
                out.append((x - m) / (m + eps) / (len(valid) if divide else 1))
    return out


def gpg(rewards, group_size, f_norm, count):
    centred = []
    for members in _groups(rewards, group_size):
        valid = [x for x in members if not math.isnan(x)]
        m = sum(valid) / len(valid) if valid else 0.0
        flat = len(valid) < 2 or max(valid) == min(valid)
        centred += [0.0 if (math.isnan(x) or flat) else x - m for x in members]
    n = sum(not math.isnan(x) for x in rewards)
    basis = rewards if count == "nonzero_rewards" else centred
    nonzero = sum(1 for x, b in zip(rewards, basis) if not math.isnan(x) and b != 0)
    alpha = n / max(nonzero, 1)
    return [alpha * c / f_norm for c in centred]


def otb(rewards, group_size, old, sum_sq, mask, is_weights=None, zero_tail=True, eps=1e-8):
    lo, S, M = _lists(old, sum_sq, mask)
    W8 = None if is_weights is None else is_weights.tolist()
    B, T = len(lo), len(lo[0])
    ok = [bool(M[i][t]) and not math.isnan(rewards[i]) for i in range(B) for t in range(T)]
    ok = [ok[i * T : (i + 1) * T] for i in range(B)]
    cum = [[0.0] * T for _ in range(B)]
    for i in range(B):
        acc = 0.0
        for t in range(T):
            if ok[i][t]:
                w = 1.0 - 2.0 * math.exp(lo[i][t]) + S[i][t]
                acc += w * (W8[i][t] ** 2 if W8 is not None else 1.0)
            cum[i][t] = acc
    adv = [[0.0] * T for _ in range(B)]
    for g in range(0, B, group_size):
        members = [i for i in range(g, g + group_size) if not math.isnan(rewards[i])]
        lengths = {i: sum(ok[i]) for i in range(g, g + group_size)}
        ranked = sorted(lengths.values(), reverse=True)
        for t in range(T):
            num = sum(rewards[i] * cum[i][t] for i in members if ok[i][t])
            den = sum(cum[i][t] for i in members if ok[i][t]) + eps
            b = num / den if len(members) > 1 else 0.0
            for i in members:
                if not ok[i][t]:
                    continue
                bi = b
                unique_longest = lengths[i] == ranked[0] and ranked.count(ranked[0]) == 1 and ranked[0] > ranked[1]
                if zero_tail and group_size > 1 and unique_longest and t >= ranked[1]:
                    bi = 0.0
                adv[i][t] = rewards[i] - bi
    return adv


def kl_k3_is(logp, ref, old, mask):
    """(value, grad); old = None means on-policy (weight 1 in value, with gradient)."""
    lp, lr, M = _lists(logp, ref, mask)
    lo = lp if old is None else old.tolist()
    value, grad = _zeros(len(lp), len(lp[0]))
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if M[i][t]:
                w = math.exp(lp[i][t] - lo[i][t])
                ratio = math.exp(lr[i][t] - lp[i][t])
                k3 = ratio - (lr[i][t] - lp[i][t]) - 1.0
                value[i][t] = w * k3
                grad[i][t] = w * (k3 + 1.0 - ratio)  # ∂w/∂logπ = w, ∂k3/∂logπ = 1 − π_ref/π_θ
    return _out(value, grad)


def vcpo_official_coefficients(rewards, advantages, norms, log_w, group_size, *, scope, use_is_weights, clip, lengths,
                       norm_by_std, eps=1e-8):
    """VCPO (mit-han-lab/vcpo ``compute_opob_baseline``, ``compute_grad_info``, ``_update_grad_buffers``): the official per-trajectory loop: for each trajectory the coefficient its gradient g_i ends up with in
    the accumulated buffer Σ scale_reward·g_i − b·Σ scale_baseline·g_i (``_update_grad_buffers``)."""
    n = len(rewards)
    groups = [list(range(g, g + group_size)) for g in range(0, n, group_size)]
    coefficient = [0.0] * n
    scopes = groups if scope == "group" else [list(range(n))]
    for members in scopes:
        num = den = 0.0
        for i in members:
            weight = norms[i]  # grad_norm_unscaled ** 2
            if use_is_weights:
                ratio = math.exp(log_w[i])
                if clip is not None:
                    ratio = min(ratio, clip)
                weight *= ratio**2
            if lengths is not None:
                weight /= lengths[i] ** 2
            value = rewards[i] if scope == "group" else advantages[i]
            num += value * weight
            den += weight
        baseline = num / (den + eps)
        std = None
        if scope == "group":
            rs = [rewards[i] for i in members]
            mean = sum(rs) / len(rs)
            std = math.sqrt(sum((r - mean) ** 2 for r in rs) / len(rs))
        for i in members:
            if scope == "group":
                scale_reward, scale_baseline = rewards[i], 1.0
                if norm_by_std and std is not None and std > 1e-8:
                    scale_reward, scale_baseline = rewards[i] / std, 1.0 / std
            else:
                scale_reward, scale_baseline = advantages[i], 1.0
            coefficient[i] = scale_reward - baseline * scale_baseline
    return coefficient
