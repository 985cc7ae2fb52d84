"""Plain-loop references for ``steadyrl.ops.losses`` and ``losses_offpolicy``, written from the paper formulas.

Each reference loops over sequences i and tokens t with Python floats and returns two (B, T) tensors:
``loss`` (the per-token term to minimise, 0 where masked) and ``grad`` = ∂(Σ_{i,t} loss)/∂ log π_θ(y_{i,t}),
derived by hand from the formula (the weights are constants, so the derivative is written out directly).
No vectorisation, no shared code with the library: a disagreement means one of the two is wrong.

``random_inputs`` builds the random LossInputs the comparisons run on; the helpers at the end (``make``,
``run``, ``close``, ``poison``, ``assert_same_result``) are shared by the two loss test files.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from steadyrl.types import LossInputs


def random_inputs(
    B: int, T: int, seed: int, *, spread: float = 0.3, per_token_adv: bool = False, holes: bool = True
) -> LossInputs:
    """Float64 inputs: log-probs in (−3, 0), π_old and μ perturbed by ``spread``, random-length masks."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    logprobs = -(torch.rand(B, T, generator=g, dtype=f64) * 3.0 + 0.05)
    old = (logprobs + spread * torch.randn(B, T, generator=g, dtype=f64)).clamp(max=-1e-3)
    rollout = (old + spread * torch.randn(B, T, generator=g, dtype=f64)).clamp(max=-1e-3)
    token_adv = torch.randn(B, T, generator=g, dtype=f64) * 2.0
    seq_adv = (torch.randn(B, 1, generator=g, dtype=f64) * 2.0).expand(B, T).clone()
    adv = token_adv if per_token_adv else seq_adv  # both drawn, so the other inputs do not depend on the choice
    lengths = torch.randint(0, T + 1, (B, 1), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths
    if holes:
        mask &= torch.rand(B, T, generator=g) > 0.15
    entropy = torch.rand(B, T, generator=g, dtype=f64) * 3.0
    return LossInputs(
        logprobs=logprobs.requires_grad_(),
        old_logprobs=old,
        advantages=adv,
        response_mask=mask,
        rollout_logprobs=rollout,
        entropy=entropy,
    )


# ---------------------------------------------------------------------------------------------------------


def _lists(*tensors):
    return [None if x is None else x.detach().tolist() for x in tensors]


def _out(loss, grad):
    return torch.tensor(loss, dtype=torch.float64), torch.tensor(grad, dtype=torch.float64)


def _zeros(B, T):
    return [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]


def _ppo_token(r, A, lo, hi, dual):
    """PPO objective term and its derivative w.r.t. log π (= r · ∂/∂r)."""
    unclipped = r * A
    clipped = min(max(r, lo), hi) * A
    if unclipped <= clipped:  # min picks the unclipped term (equal inside the clip range)
        obj, dobj = unclipped, r * A
    else:
        obj, dobj = clipped, 0.0
    if dual is not None and A < 0 and dual * A > obj:
        obj, dobj = dual * A, 0.0
    return -obj, -dobj


def reinforce(logp, adv, mask):
    lp, A, M = _lists(logp, adv, mask)
    loss, grad = _zeros(len(lp), len(lp[0]))
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if M[i][t]:
                loss[i][t] = -A[i][t] * lp[i][t]
                grad[i][t] = -A[i][t]
    return _out(loss, grad)


def ppo_clip(logp, old, adv, mask, eps_low, eps_high, dual_clip=None):
    lp, lo_, A, M = _lists(logp, old, adv, mask)
    loss, grad = _zeros(len(lp), len(lp[0]))
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if M[i][t]:
                r = math.exp(lp[i][t] - lo_[i][t])
                loss[i][t], grad[i][t] = _ppo_token(r, A[i][t], 1 - eps_low, 1 + eps_high, dual_clip)
    return _out(loss, grad)


def gspo(logp, old, adv, mask, eps_low, eps_high, per_token=False):
    """Sequence ratio s_i = exp(mean_t log r); Â_i = mean_t Â (or Â_t for GSPO-token)."""
    lp, lo_, A, M = _lists(logp, old, adv, mask)
    B, T = len(lp), len(lp[0])
    loss, grad = _zeros(B, T)
    for i in range(B):
        tokens = [t for t in range(T) if M[i][t]]
        if not tokens:
            continue
        s = math.exp(sum(lp[i][t] - lo_[i][t] for t in tokens) / len(tokens))
        seq_adv = sum(A[i][t] for t in tokens) / len(tokens)
        for t in tokens:
            a = A[i][t] if per_token else seq_adv
            # sequence GSPO: Σ_t ℓ = |y| f(s), ∂/∂lp_t = |y| f'(s) s / |y| = f'(s) s — same per-token value
            loss[i][t], grad[i][t] = _ppo_token(s, a, 1 - eps_low, 1 + eps_high, None)
    return _out(loss, grad)


def cispo(logp, old, adv, mask, eps_high, eps_low=None):
    lp, lo_, A, M = _lists(logp, old, adv, mask)
    loss, grad = _zeros(len(lp), len(lp[0]))
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if M[i][t]:
                w = min(math.exp(lp[i][t] - lo_[i][t]), 1 + eps_high)
                if eps_low is not None:
                    w = max(w, 1 - eps_low)
                loss[i][t] = -w * A[i][t] * lp[i][t]
                grad[i][t] = -w * A[i][t]
    return _out(loss, grad)


def steer(logp, old, adv, entropy, mask, eps_low, eps_high, dual_clip, w_min, w_max, mapping="linear"):
    lp, lo_, A, H, M = _lists(logp, old, adv, entropy, mask)
    B, T = len(lp), len(lp[0])
    omega = {}
    for i in range(B):
        for t in range(T):
            if M[i][t]:
                x = min(max(math.exp(lp[i][t]), 1e-8), 1 - 1e-8)
                x_old = min(max(math.exp(lo_[i][t]), 1e-8), 1.0)
                omega[i, t] = abs(A[i][t] / x_old * x * (1 - x) * (math.log(x) + H[i][t]))
    loss, grad = _zeros(B, T)
    if not omega:
        return _out(loss, grad)
    lo, hi = min(omega.values()), max(omega.values())
    for (i, t), om in omega.items():
        if mapping == "linear":
            lam = w_max - (om - lo) * (w_max - w_min) / (hi - lo) if hi > lo else (w_min + w_max) / 2
            lam = min(max(lam, w_min), w_max)
        else:
            k = -math.log(w_min) / max(hi, 0.02)
            lam = min(max(math.exp(-k * om), w_min), 1.0)
        r = math.exp(lp[i][t] - lo_[i][t])
        ell, g = _ppo_token(r, A[i][t], 1 - eps_low, 1 + eps_high, dual_clip)
        loss[i][t], grad[i][t] = lam * ell, lam * g
    return _out(loss, grad)


def _covariances(lp, A, M, extra=(0.0, 0.0, 0.0)):
    B, T = len(lp), len(lp[0])
    valid = [(i, t) for i in range(B) for t in range(T) if M[i][t]]
    n = len(valid) + extra[2]
    mean_a = (sum(A[i][t] for i, t in valid) + extra[0]) / max(n, 1)
    mean_l = (sum(lp[i][t] for i, t in valid) + extra[1]) / max(n, 1)
    return valid, {(i, t): (A[i][t] - mean_a) * (lp[i][t] - mean_l) for i, t in valid}


def clip_cov(logp, old, adv, mask, eps_low, eps_high, ratio, cov_low, cov_high, keys, extra=(0.0, 0.0, 0.0)):
    """``keys``: the uniform draws used to pick candidates (smallest first); ``extra``: other ranks' sums."""
    lp, lo_, A, M, K = _lists(logp, old, adv, mask, keys)
    B, T = len(lp), len(lp[0])
    valid, cov = _covariances(lp, A, M, extra)
    loss, grad = _zeros(B, T)
    candidates = []
    for i, t in valid:
        r = math.exp(lp[i][t] - lo_[i][t])
        loss[i][t], grad[i][t] = _ppo_token(r, A[i][t], 1 - eps_low, 1 + eps_high, None)
        clipped = (A[i][t] > 0 and r > 1 + eps_high) or (A[i][t] < 0 and r < 1 - eps_low)
        if not clipped and cov_low < cov[i, t] < cov_high:
            candidates.append((K[i][t], i, t))
    n_pick = max(int(math.floor(ratio * len(valid))), 1)
    for _, i, t in sorted(candidates)[:n_pick]:
        loss[i][t], grad[i][t] = 0.0, 0.0
    return _out(loss, grad)


def kl_cov(logp, old, adv, mask, ratio, beta, eps_low=None, eps_high=None):
    lp, lo_, A, M = _lists(logp, old, adv, mask)
    B, T = len(lp), len(lp[0])
    valid, cov = _covariances(lp, A, M)
    k = max(int(math.floor(ratio * len(valid))), 1)
    ranked = sorted(valid, key=lambda it: -cov[it])  # stable: ties keep row-major order
    selected = set(ranked[:k])
    loss, grad = _zeros(B, T)
    lo = 1 - eps_low if eps_low is not None else 0.0
    hi = 1 + eps_high if eps_high is not None else math.inf
    for i, t in valid:
        log_r = lp[i][t] - lo_[i][t]
        loss[i][t], grad[i][t] = _ppo_token(math.exp(log_r), A[i][t], lo, hi, None)
        if (i, t) in selected:
            loss[i][t] += beta * abs(log_r)
            grad[i][t] += beta * (1.0 if log_r > 0 else -1.0 if log_r < 0 else 0.0)
    return _out(loss, grad)


def reinforce_is(logp, old, mu, adv, mask, eps_low, eps_high, cap):
    lp, lo_, lm, A, M = _lists(logp, old, mu, adv, mask)
    loss, grad = _zeros(len(lp), len(lp[0]))
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if not M[i][t]:
                continue
            r = math.exp(lp[i][t] - lo_[i][t])
            stale = (A[i][t] > 0 and r > 1 + eps_high) or (A[i][t] < 0 and r < 1 - eps_low)
            w = 0.0 if stale else min(math.exp(lp[i][t] - lm[i][t]), cap)
            loss[i][t], grad[i][t] = -w * A[i][t] * lp[i][t], -w * A[i][t]
    return _out(loss, grad)


def dppo(logp, old, mu, adv, mask, divergence, delta_low, delta_high, cap, anchor="rollout"):
    lp, lo_, lm, A, M = _lists(logp, old, mu, adv, mask)
    loss, grad = _zeros(len(lp), len(lp[0]))
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if not M[i][t]:
                continue
            p = math.exp(lp[i][t])
            q = math.exp(lm[i][t] if anchor == "rollout" else lo_[i][t])
            if divergence == "tv":
                d = abs(p - q)
            else:
                d = q * math.log(q / p) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
            invalid = (A[i][t] > 0 and p > q and (p - q > delta_high if divergence == "tv" else d > delta_high)) or (
                A[i][t] < 0 and p < q and (q - p > delta_low if divergence == "tv" else d > delta_low)
            )
            w = 0.0 if invalid else min(p / math.exp(lm[i][t]), cap)
            loss[i][t], grad[i][t] = -A[i][t] * w * lp[i][t], -A[i][t] * w
    return _out(loss, grad)


def cpgd(logp, old, adv, mask, eps_low, eps_high, alpha, estimator="k3"):
    lp, lo_, A, M = _lists(logp, old, adv, mask)
    loss, grad = _zeros(len(lp), len(lp[0]))
    lo, hi = math.log(1 - eps_low), math.log(1 + eps_high)
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if not M[i][t]:
                continue
            x, a = lp[i][t] - lo_[i][t], A[i][t]
            unclipped, clipped = x * a, min(max(x, lo), hi) * a
            obj, dobj = (unclipped, a) if unclipped <= clipped else (clipped, 0.0)
            if estimator == "k1":
                kl, dkl = -x, -1.0
            elif estimator == "k2":
                kl, dkl = 0.5 * x * x, x
            else:
                kl, dkl = math.exp(x) - 1 - x, math.exp(x) - 1
            loss[i][t], grad[i][t] = -obj + alpha * kl, -dobj + alpha * dkl
    return _out(loss, grad)


def bapo(logp, old, adv, mask, low_start, low_max, low_step, high_start, high_max, high_step, target, dual, eps):
    """The BAPO recipe's search loop (raise c_low first, then c_high), then dual-clip PPO."""
    lp, lo_, A, M = _lists(logp, old, adv, mask)
    B, T = len(lp), len(lp[0])
    tokens = [(math.exp(lp[i][t] - lo_[i][t]), A[i][t]) for i in range(B) for t in range(T) if M[i][t]]

    def pos_over_neg(c_low, c_high):
        pos = neg = 0.0
        for r, a in tokens:
            eff = (min(r, c_high) if a >= 0 else max(r, c_low)) * a
            pos, neg = pos + max(eff, 0.0), neg + max(-eff, 0.0)
        return math.inf if neg <= 0 else pos / (neg + eps)

    c_low, c_high = low_start, high_start
    while pos_over_neg(c_low, c_high) < target and c_low < low_max and low_step > 0:
        c_low = min(c_low + low_step, low_max)
    while pos_over_neg(c_low, c_high) < target and c_high < high_max and high_step > 0:
        c_high = min(c_high + high_step, high_max)
    loss, grad = _zeros(B, T)
    for i in range(B):
        for t in range(T):
            if M[i][t]:
                r = math.exp(lp[i][t] - lo_[i][t])
                loss[i][t], grad[i][t] = _ppo_token(r, A[i][t], c_low, c_high, dual)
    return (*_out(loss, grad), c_low, c_high)


def vespo(logp, mu, adv, mask, c1_pos, c2_pos, c1_neg, c2_neg):
    lp, lm, A, M = _lists(logp, mu, adv, mask)
    B, T = len(lp), len(lp[0])
    loss, grad = _zeros(B, T)
    for i in range(B):
        W = math.exp(sum(lp[i][t] - lm[i][t] for t in range(T) if M[i][t]))
        for t in range(T):
            if M[i][t]:
                c1, c2 = (c1_pos, c2_pos) if A[i][t] >= 0 else (c1_neg, c2_neg)
                phi = W**c1 * math.exp(c2 * (1 - W))
                loss[i][t], grad[i][t] = -phi * A[i][t] * lp[i][t], -phi * A[i][t]
    return _out(loss, grad)


def minpro(logp, mu, adv, mask, cap, include_current=False):
    lp, lm, A, M = _lists(logp, mu, adv, mask)
    B, T = len(lp), len(lp[0])
    loss, grad = _zeros(B, T)
    for i in range(B):
        seen = []  # ratios of valid earlier tokens
        for t in range(T):
            if not M[i][t]:
                continue
            rho = math.exp(lp[i][t] - lm[i][t])
            prefix = seen + [rho] if include_current else seen
            w = min(rho, cap) * min(min(prefix), 1.0) if prefix else min(rho, cap)
            loss[i][t], grad[i][t] = -w * A[i][t] * lp[i][t], -w * A[i][t]
            seen.append(rho)
    return _out(loss, grad)


# ---------------------------------------------------------------------------------------------------------
# Test helpers shared by tests/ops/test_losses*.py (not references)
# ---------------------------------------------------------------------------------------------------------

NAN = float("nan")
F64 = torch.float64


def make(logprobs, old=None, adv=None, mask=None, rollout=None, entropy=None, reduce_sum=None) -> LossInputs:
    """Float64 LossInputs from nested lists; old defaults to logprobs (on-policy), mask to all True."""
    lp = torch.tensor(logprobs, dtype=F64)
    t = lambda x: None if x is None else torch.tensor(x, dtype=F64)  # noqa: E731
    fields = dict(
        logprobs=lp.clone().requires_grad_(),
        old_logprobs=lp.clone() if old is None else t(old),
        advantages=t(adv),
        response_mask=torch.ones_like(lp, dtype=torch.bool) if mask is None else torch.tensor(mask),
        rollout_logprobs=t(rollout),
        entropy=t(entropy),
    )
    if reduce_sum is not None:
        fields["reduce_sum"] = reduce_sum
    return LossInputs(**fields)


def run(fn, inputs: LossInputs, **kw):
    """(loss, ∂Σloss/∂logprobs, metrics) for a fresh leaf copy of inputs.logprobs."""
    inputs = dataclasses.replace(inputs, logprobs=inputs.logprobs.detach().clone().requires_grad_())
    out = fn(inputs, **kw)
    out.loss.sum().backward()
    return out.loss.detach(), inputs.logprobs.grad, out.metrics


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), rtol=tol, atol=tol)


def poison(inputs: LossInputs, value: float) -> LossInputs:
    """Masked positions of every (B, T) input set to ``value``."""
    m = inputs.response_mask
    fill = lambda x: None if x is None else torch.where(m, x.detach(), torch.full_like(x, value))  # noqa: E731
    return dataclasses.replace(
        inputs,
        logprobs=fill(inputs.logprobs).requires_grad_(),
        old_logprobs=fill(inputs.old_logprobs),
        advantages=fill(inputs.advantages),
        rollout_logprobs=fill(inputs.rollout_logprobs),
        entropy=fill(inputs.entropy),
    )


def assert_same_result(fn, kw, a: LossInputs, b: LossInputs, crop: int | None = None):
    loss_a, grad_a, m_a = run(fn, a, **kw)
    loss_b, grad_b, m_b = run(fn, b, **kw)
    T = crop if crop is not None else loss_a.shape[1]
    torch.testing.assert_close(loss_b[:, :T], loss_a[:, :T], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_b[:, :T], grad_a[:, :T], rtol=1e-12, atol=1e-12)
    assert torch.all(loss_b[:, T:] == 0) and torch.all(grad_b[:, T:] == 0)
    assert m_a.keys() == m_b.keys()
    for k in m_a:
        torch.testing.assert_close(m_b[k], m_a[k], rtol=1e-12, atol=1e-12, msg=k)
