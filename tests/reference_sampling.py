"""Plain-loop references for the sampling layer's math, written from the official code's structure (dicts of
lists per prompt, Python floats), not from steadyrl's tensor code: DCPO, RiskPO, ADORA, COPO, DAPO overlong,
the IQR fence and the Beta posterior."""

from __future__ import annotations

import math
import statistics
from collections import Counter


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def dcpo_reference(groups: list[list[float]], history: list[tuple[float, float, int]], old_scale: float = 1.0):
    """DCPO (lime-RL/DCPO compute_dcpo_outcome_advantage + get_mean_std): advantages per group and the new
    (mean, std, times) per prompt.  ``history`` holds (old_mean, old_std, times) per group."""
    out, new_hist = [], []
    for rewards, (old_mean, old_std, times) in zip(groups, history):
        new_mean, new_std = statistics.fmean(rewards), _std(rewards)
        m_old, s_old = old_mean * old_scale, old_std * old_scale
        count = times + 1  # get_mean_std(times=times+1): old_times = times
        if times == 0:
            mean, std = new_mean, new_std
        else:
            mean = (m_old * times + new_mean) / (times + 1)
            var = (times * s_old**2 + new_std**2 + times / count * (new_mean - m_old) ** 2) / count
            std = math.sqrt(var)
        adv = []
        for r in rewards:
            a_new = (r - new_mean) / new_std if new_std > 0 else 0.0
            a_old = (r - mean) / std if std > 0 else 0.0
            s1 = 1 / count * a_old + (1 - 1 / count) * a_new
            s2 = 1 / count * a_new + (1 - 1 / count) * a_old
            adv.append(s1 if abs(s1) < abs(s2) else s2)
        out.append(adv)
        new_hist.append((mean, std, times + 1))
    return out, new_hist


def _quantile(xs: list[float], q: float) -> float:
    """torch.quantile's default (linear interpolation between order statistics)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def riskpo_reference(groups: list[list[float]], bundle_size: int, q_down=0.2, q_up=0.9, tracked=None, w_mix=1.5,
                     credit="std", eps=1e-6):
    """RiskPO (RTkenny/RiskPO compute_grpo_bundle_rvar_outcome_advantage_quantile_tracking, script settings:
    mixing risk measure, natural baseline, norm by std, use_q_track_mode 'track')."""
    adv = [[0.0] * len(g) for g in groups]
    for start in range(0, len(groups), bundle_size):
        questions = list(range(start, min(start + bundle_size, len(groups))))
        papers = [sum(groups[q][j] for q in questions) for j in range(len(groups[0]))]
        a, b = (tracked if tracked is not None else (_quantile(papers, q_down), _quantile(papers, q_up)))
        std = _std(papers) if len(papers) > 1 else 1.0
        for j, s in enumerate(papers):
            rvar = max(s - a, 0) - max(s - b, 0) + a - b
            rvar /= q_up - q_down + eps
            cvar = -max(a - s, 0) / (q_down + eps)
            p = (w_mix * cvar + rvar) / (w_mix + 1)
            p = p / (std + eps) if std > 0 else p  # steadyrl's zero_std_bundle="unscaled"
            for q in questions:
                if credit == "uniform":
                    adv[q][j] = p
                else:
                    qs = _std(groups[q])
                    adv[q][j] = p / ((qs if qs > 1e-3 else 1.0) + eps)
    return adv


def adora_reference(groups: list[list[float]], lengths: list[list[float]], correct_score=0.5, lam=0.1,
                    max_length=100.0, eps=1e-6):
    out = []
    for rewards, lens in zip(groups, lengths):
        pos = [n for r, n in zip(rewards, lens) if r > correct_score]
        neg = [n for r, n in zip(rewards, lens) if r <= correct_score and n < max_length]
        max_pos = max(pos) if pos else -math.inf
        mean_neg = statistics.fmean(neg) if neg else -math.inf
        mean, std = statistics.fmean(rewards), _std(rewards)
        adv = [(r - mean) / (std + eps) for r in rewards]
        out.append(adv if max_pos > mean_neg else [a * lam for a in adv])
    return out


def copo_reference(groups: list[list[float]], answers: list[list[str]], k=5.0, b=1.0, blend="soft_with_zero", eps=1e-6):
    entropies = []
    for ans in answers:
        counts = Counter(ans)
        entropies.append(-sum(c / len(ans) * math.log2(c / len(ans)) for c in counts.values()))
    glob = [statistics.fmean(g) for g in groups]
    g_mean, g_std = statistics.fmean(glob), _std(glob)
    out = []
    for rewards, h, gr in zip(groups, entropies, glob):
        mean, std = statistics.fmean(rewards), _std(rewards)
        w_soft = 1 / (1 + math.exp(-k * (h - b)))
        row = []
        for r in rewards:
            local = (r - mean) / (std + eps)
            global_adv = (gr - g_mean) / (g_std + eps)
            w = {"soft_with_zero": w_soft * (r != 0), "only_soft": w_soft, "only_global": 0.0, "no_global": 1.0}[blend]
            row.append((1 - w) * global_adv + w * local)
        out.append(row)
    return out


def overlong_reference(length: int, max_len: int, buffer_len: int, factor: float = 1.0) -> float:
    """verl DAPORewardManager: expected_len = max_resp_len − buffer; min(−exceed/buffer·factor, 0)."""
    exceed = length - (max_len - buffer_len)
    return min(-exceed / buffer_len * factor, 0.0)


def iqr_keep_reference(values: list[float], k: float = 1.5) -> list[bool]:
    q1, q3 = _quantile(values, 0.25), _quantile(values, 0.75)
    return [v >= q1 - k * (q3 - q1) for v in values]
