"""Plain-loop references for ops/correction.py, ops/diagnostics.py, ops/ratios.py and ops/logprobs.py.

Written straight from the formulas (methods.md §6.23, verl rollout_corr docs, TRL paper index), with Python
floats and explicit loops over sequences i and tokens t; no vectorisation, no torch ops in the math. Each
function takes nested lists (``tensor.tolist()``) and returns Python numbers / lists.
"""

from __future__ import annotations

import math

CLAMP = 20.0  # ratios.LOG_RATIO_CLAMP


def clamp(x: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, x))


def log_or_neg_inf(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


# ---------------------------------------------------------------- ratios.py


def token_log_ratio(logp, base, mask, c=CLAMP):
    return [
        [clamp(logp[i][t] - base[i][t], -c, c) if mask[i][t] else 0.0 for t in range(len(mask[i]))]
        for i in range(len(mask))
    ]


def sequence_log_ratio(logp, base, mask, c=CLAMP):
    out = []
    for i in range(len(mask)):
        total, n = 0.0, 0
        for t in range(len(mask[i])):
            if mask[i][t]:
                total += logp[i][t] - base[i][t]
                n += 1
        out.append(clamp(total / n, -c, c) if n else 0.0)
    return out


def prefix_min_log_ratio(log_ratio, mask, include_current=False):
    out = []
    for i in range(len(mask)):
        row = []
        for t in range(len(mask[i])):
            if not mask[i][t]:
                row.append(0.0)
                continue
            last = t + 1 if include_current else t
            prefix = [log_ratio[i][s] for s in range(last) if mask[i][s]]
            row.append(min(min(prefix), 0.0) if prefix else 0.0)
        out.append(row)
    return out


# ---------------------------------------------------------------- corrections


def valid_seq(mask, i):
    return any(mask[i])


def ess(weights, selected):
    """(Σw)² / (N Σw²) over selected weights; 0 when none or all zero."""
    n, s1, s2 = 0, 0.0, 0.0
    for w, sel in zip(weights, selected):
        if sel:
            n += 1
            s1 += w
            s2 += w * w
    return s1 * s1 / (n * s2) if n and s2 > 0 else 0.0


def weight_stats(weights, selected):
    chosen = [w for w, sel in zip(weights, selected) if sel]
    return {
        "mismatch/is_weight_mean": sum(chosen) / len(chosen) if chosen else 0.0,
        "mismatch/is_weight_min": min(chosen) if chosen else float("inf"),
        "mismatch/is_weight_max": max(chosen) if chosen else float("-inf"),
        "mismatch/is_ess": ess(weights, selected),
    }


def token_mean(values, mask):
    total, n = 0.0, 0
    for i in range(len(mask)):
        for t in range(len(mask[i])):
            if mask[i][t]:
                total += values[i][t]
                n += 1
    return total / n if n else 0.0


def seq_mean(values, selected):
    chosen = [v for v, s in zip(values, selected) if s]
    return sum(chosen) / len(chosen) if chosen else 0.0


def kl_metrics(log_rho, mask):
    k1 = token_mean([[-x for x in row] for row in log_rho], mask)
    k3 = token_mean([[math.exp(x) - x - 1.0 for x in row] for row in log_rho], mask)
    return {"mismatch/kl_k1": k1, "mismatch/kl_k3": k3}


def flat(rows, mask):
    """Token values and selection flags as flat lists (row-major)."""
    return [v for row in rows for v in row], [m for row in mask for m in row]


def token_tis(anchor, rollout, mask, cap):
    log_rho = token_log_ratio(anchor, rollout, mask)
    weights = [
        [min(math.exp(x), cap) if mask[i][t] else 1.0 for t, x in enumerate(row)]
        for i, row in enumerate(log_rho)
    ]
    metrics = kl_metrics(log_rho, mask)
    metrics.update(weight_stats(*flat(weights, mask)))
    metrics["mismatch/masked_frac"] = 0.0
    metrics["mismatch/truncated_frac"] = token_mean(
        [[float(math.exp(x) > cap) for x in row] for row in log_rho], mask
    )
    keep = [[True] * len(row) for row in mask]
    return weights, keep, metrics


def seq_tis(anchor, rollout, mask, cap):
    log_rho = token_log_ratio(anchor, rollout, mask)
    seq_w, truncated = [], []
    for i in range(len(mask)):
        product = 1.0
        for t in range(len(mask[i])):
            if mask[i][t]:
                product *= math.exp(log_rho[i][t])  # Π_t ρ_t, small test values: no overflow
        seq_w.append(min(product, cap))
        truncated.append(float(product > cap))
    weights = [[seq_w[i] if mask[i][t] else 1.0 for t in range(len(mask[i]))] for i in range(len(mask))]
    valid = [valid_seq(mask, i) for i in range(len(mask))]
    metrics = kl_metrics(log_rho, mask)
    metrics.update(weight_stats(seq_w, valid))
    metrics["mismatch/masked_frac"] = 0.0
    metrics["mismatch/truncated_frac"] = seq_mean(truncated, valid)
    keep = [[True] * len(row) for row in mask]
    return weights, keep, metrics


def token_mis(anchor, rollout, mask, ratio_min, ratio_max):
    log_rho = token_log_ratio(anchor, rollout, mask)
    weights, keep, low, high = [], [], [], []
    for i in range(len(mask)):
        w_row, k_row, lo_row, hi_row = [], [], [], []
        for t in range(len(mask[i])):
            rho = math.exp(log_rho[i][t])
            inside = ratio_min <= rho <= ratio_max
            lo_row.append(float(rho < ratio_min))
            hi_row.append(float(rho > ratio_max))
            if not mask[i][t]:
                w_row.append(1.0)
                k_row.append(True)
            else:
                w_row.append(rho if inside else 0.0)  # w = ρ · 𝟙[C_min ≤ ρ ≤ C_max]
                k_row.append(inside)
        weights.append(w_row)
        keep.append(k_row)
        low.append(lo_row)
        high.append(hi_row)
    kept = [[mask[i][t] and keep[i][t] for t in range(len(mask[i]))] for i in range(len(mask))]
    metrics = kl_metrics(log_rho, mask)
    metrics.update(weight_stats(*flat(weights, kept)))
    metrics["mismatch/masked_frac"] = token_mean([[float(not k) for k in row] for row in keep], mask)
    metrics["mismatch/masked_frac_low"] = token_mean(low, mask)
    metrics["mismatch/masked_frac_high"] = token_mean(high, mask)
    return weights, keep, metrics


def _seq_rejection_metrics(keep_seq, mask):
    valid = [valid_seq(mask, i) for i in range(len(mask))]
    keep_tok = [[keep_seq[i]] * len(mask[i]) for i in range(len(mask))]
    return {
        "mismatch/masked_frac": token_mean([[float(not k) for k in row] for row in keep_tok], mask),
        "mismatch/masked_seq_frac": seq_mean([float(not k) for k in keep_seq], valid),
    }


def _broadcast_result(seq_w, keep_seq, mask):
    weights = [[seq_w[i] if mask[i][t] else 1.0 for t in range(len(mask[i]))] for i in range(len(mask))]
    keep = [[keep_seq[i] or not mask[i][t] for t in range(len(mask[i]))] for i in range(len(mask))]
    return weights, keep


def seq_mis(anchor, rollout, mask, ratio_min, ratio_max):
    log_rho = token_log_ratio(anchor, rollout, mask)
    seq_w, keep_seq = [], []
    for i in range(len(mask)):
        product = 1.0
        for t in range(len(mask[i])):
            if mask[i][t]:
                product *= math.exp(log_rho[i][t])
        inside = ratio_min <= product <= ratio_max
        keep_seq.append(inside)
        seq_w.append(product if inside else 0.0)
    valid = [valid_seq(mask, i) for i in range(len(mask))]
    metrics = kl_metrics(log_rho, mask)
    metrics.update(weight_stats(seq_w, [v and k for v, k in zip(valid, keep_seq)]))
    metrics.update(_seq_rejection_metrics(keep_seq, mask))
    return (*_broadcast_result(seq_w, keep_seq, mask), metrics)


def geo_rs(anchor, rollout, mask, ratio_min, ratio_max):
    log_rho = token_log_ratio(anchor, rollout, mask)
    keep_seq, geo = [], []
    for i in range(len(mask)):
        logs = [log_rho[i][t] for t in range(len(mask[i])) if mask[i][t]]
        g = math.exp(sum(logs) / len(logs)) if logs else 1.0  # geometric mean of ρ
        geo.append(g)
        keep_seq.append(ratio_min <= g <= ratio_max)
    valid = [valid_seq(mask, i) for i in range(len(mask))]
    metrics = kl_metrics(log_rho, mask)
    metrics["mismatch/geo_ratio_min"] = min([g for g, v in zip(geo, valid) if v], default=float("inf"))
    metrics["mismatch/geo_ratio_max"] = max([g for g, v in zip(geo, valid) if v], default=0.0)
    ones = [1.0] * len(mask)
    metrics.update(weight_stats(ones, [v and k for v, k in zip(valid, keep_seq)]))
    metrics.update(_seq_rejection_metrics(keep_seq, mask))
    return (*_broadcast_result(ones, keep_seq, mask), metrics)


def geo_rs_k3(anchor, rollout, mask, k3_max):
    log_rho = token_log_ratio(anchor, rollout, mask)
    keep_seq, k3s = [], []
    for i in range(len(mask)):
        terms = [math.exp(x) - x - 1.0 for x, m in zip(log_rho[i], mask[i]) if m]
        k3 = sum(terms) / len(terms) if terms else 0.0
        k3s.append(k3)
        keep_seq.append(k3 <= k3_max)
    valid = [valid_seq(mask, i) for i in range(len(mask))]
    metrics = kl_metrics(log_rho, mask)
    metrics["mismatch/seq_k3_max"] = max([k for k, v in zip(k3s, valid) if v], default=float("-inf"))
    ones = [1.0] * len(mask)
    metrics.update(weight_stats(ones, [v and k for v, k in zip(valid, keep_seq)]))
    metrics.update(_seq_rejection_metrics(keep_seq, mask))
    return (*_broadcast_result(ones, keep_seq, mask), metrics)


def opsm(behaviour, current, advantages, mask, delta):
    """M_{i,t} = 0 iff Â_{i,t} < 0 and (1/|y_i|) Σ_t log(π_b/π_θ) > δ."""
    log_drift = token_log_ratio(behaviour, current, mask)
    drift = []
    for i in range(len(mask)):
        logs = [log_drift[i][t] for t in range(len(mask[i])) if mask[i][t]]
        drift.append(sum(logs) / len(logs) if logs else 0.0)
    keep = [
        [not (mask[i][t] and advantages[i][t] < 0 and drift[i] > delta) for t in range(len(mask[i]))]
        for i in range(len(mask))
    ]
    valid = [valid_seq(mask, i) for i in range(len(mask))]
    metrics = {
        "mismatch/kl_k1": token_mean(log_drift, mask),
        "mismatch/kl_k3": token_mean([[math.exp(-x) - 1.0 + x for x in row] for row in log_drift], mask),
        "opsm/drift_mean": seq_mean(drift, valid),
        "opsm/drift_max": max([d for d, v in zip(drift, valid) if v], default=float("-inf")),
    }
    kept = [[mask[i][t] and keep[i][t] for t in range(len(mask[i]))] for i in range(len(mask))]
    metrics.update(weight_stats(*flat([[1.0] * len(r) for r in mask], kept)))
    rejected_seq = [any(mask[i][t] and not keep[i][t] for t in range(len(mask[i]))) for i in range(len(mask))]
    metrics["mismatch/masked_frac"] = token_mean([[float(not k) for k in row] for row in keep], mask)
    metrics["mismatch/masked_seq_frac"] = seq_mean([float(r) for r in rejected_seq], valid)
    weights = [[1.0] * len(row) for row in mask]
    return weights, keep, metrics


def mismatch_metrics(trainer, rollout, mask):
    log_rho = token_log_ratio(trainer, rollout, mask)
    valid = [valid_seq(mask, i) for i in range(len(mask))]
    gaps = []
    for i in range(len(mask)):
        n = sum(1 for m in mask[i] if m)
        mean_mu = sum(rollout[i][t] for t in range(len(mask[i])) if mask[i][t]) / max(n, 1)
        mean_pi = sum(trainer[i][t] for t in range(len(mask[i])) if mask[i][t]) / max(n, 1)
        gaps.append(abs(mean_mu - mean_pi))  # |log PPL_π − log PPL_μ|
    abs_diffs = [abs(log_rho[i][t]) for i in range(len(mask)) for t in range(len(mask[i])) if mask[i][t]]
    return {
        **kl_metrics(log_rho, mask),
        "mismatch/chi2": token_mean([[math.exp(x) ** 2 for x in row] for row in log_rho], mask) - 1.0
        if abs_diffs
        else 0.0,
        "mismatch/ratio_mean": token_mean([[math.exp(x) for x in row] for row in log_rho], mask),
        "mismatch/abs_logprob_diff_mean": token_mean([[abs(x) for x in row] for row in log_rho], mask),
        "mismatch/abs_logprob_diff_max": max(abs_diffs, default=-math.inf),
        "mismatch/log_ppl_abs_diff_mean": seq_mean(gaps, valid),
    }


# ---------------------------------------------------------------- diagnostics


def entropy(logits_rows):
    out = []
    for row in logits_rows:
        m = max(row)
        norm = m + math.log(sum(math.exp(z - m) for z in row))
        h = 0.0
        for z in row:
            p = math.exp(z - norm)
            if p > 0:
                h -= p * (z - norm)
        out.append(h)
    return out


def clip_fractions(ratio, advantages, mask, eps_low, eps_high):
    low = [
        [float(ratio[i][t] < 1 - eps_low and advantages[i][t] < 0) for t in range(len(mask[i]))]
        for i in range(len(mask))
    ]
    high = [
        [float(ratio[i][t] > 1 + eps_high and advantages[i][t] > 0) for t in range(len(mask[i]))]
        for i in range(len(mask))
    ]
    lo, hi = token_mean(low, mask), token_mean(high, mask)
    return {"ratio/clip_frac_low": lo, "ratio/clip_frac_high": hi, "ratio/clip_frac": lo + hi}


def approx_kl_k3(logp, old, mask):
    log_r = token_log_ratio(logp, old, mask)
    return token_mean([[math.exp(x) - 1.0 - x for x in row] for row in log_r], mask)


def zero_variance_group_frac(rewards, group_size):
    groups = [rewards[g : g + group_size] for g in range(0, len(rewards), group_size)]
    flat_count = 0
    for group in groups:
        present = [r for r in group if not math.isnan(r)]
        if len(present) <= 1 or all(r == present[0] for r in present):
            flat_count += 1
    return flat_count / len(groups)


# ---------------------------------------------------------------- logprobs


def selective_log_softmax(logits_rows, ids):
    out = []
    for row, k in zip(logits_rows, ids):
        m = max(row)
        out.append(row[k] - (m + math.log(sum(math.exp(z - m) for z in row))))
    return out
