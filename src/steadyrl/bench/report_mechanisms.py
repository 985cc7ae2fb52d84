"""The mechanism lab's report: report.md and PNG figures from results.jsonl (bench/mechanisms.py).

    steadyrl bench mechanisms --quick --report-only      # re-render from OUT/results.jsonl

Every number is a mean over seeds with its 95 % Student-t interval (bench/lab_stats.py); the tables are
computed, the reading of them is docs/results/stability/claims.md. Protocol: docs/stability-lab.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steadyrl.bench.lab_stats import fmt_ci, mean_ci, ordered, select, values

METHOD_ORDER = ("none", "tis", "minirl", "ppo_clip", "seq_is")
MISMATCH_ORDER = ("fp32", "bf16", "fp8", "noise1", "noise3")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rerender(out: str | Path) -> list[Path]:
    out = Path(out)
    if not (out / "results.jsonl").is_file():
        from steadyrl.config import ConfigError

        raise ConfigError(f"{out} has no results.jsonl; pass the --out of a finished `steadyrl bench mechanisms`.")
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return write_report(out, read_rows(out / "results.jsonl"), meta)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in body), ""]


# ----------------------------------------------------------------------------- formulation


def formulation_section(rows: list[dict[str, Any]]) -> list[str]:
    f = select(rows, item="formulation")
    if not f:
        return []
    lines = ["## 1. Formulation (arXiv 2512.01374): does the trainer's gradient track ∇J_seq?", ""]
    setup = select(f, kind="setup")
    mism = ordered([{"m": m} for r in setup for m in r["mismatch"]], "m", MISMATCH_ORDER)
    lines += [f"Enumerated set: {fmt_ci(values(setup, 'rows'), 4)} completions for the prompts of a seed, covering "
              f"{fmt_ci(values(setup, 'mass_min'), 5)} (least-covered prompt) of π_old's mass; J_S(θ_old) = "
              f"{fmt_ci(values(setup, 'J'))}{_length_note(setup)}. Mismatch of each sampler against the fp32 policy at θ_old "
              "(μ-weighted per-token k3, sequence KL(μ ‖ π_old)):", ""]
    body = [[m, fmt_ci([r["mismatch"][m]["k3"] for r in setup]), fmt_ci([r["mismatch"][m]["seq_kl_mu_old"] for r in setup])]
            for m in mism]
    lines += _table(["sampler", "k3 per token", "sequence KL"], body)
    noise = select(f, kind="noise")
    if noise:
        lines += ["**Noise floor**: one sampled mini-batch's training gradient against its own exact expectation "
                  "(method none, fp32), ‖ĝ − E g‖ / ‖c ∇J‖ (RMS over batches), and its cosine with ∇J:", ""]
        body = []
        for n in ordered(noise, "N", sort=int):
            for agg in ordered(noise, "agg"):
                sub = select(noise, N=n, agg=agg)
                body.append([str(n), agg, str(sub[0]["minibatch"]), fmt_ci(values(sub, "noise_rel")), fmt_ci(values(sub, "noise_cos"))])
        lines += _table(["N", "aggregation", "mini-batch", "noise rel. error", "cos(ĝ, ∇J)"], body)
    axis = select(f, kind="mismatch")
    if axis:
        lines += ["**Mismatch axis** (N = 1, θ = θ_old): relative error ‖E g − c∇J‖ / ‖c∇J‖ (cosine in brackets). "
                  "ppo_clip equals none and minirl equals tis at N = 1 (ratio to π_old ≡ 1); seq_is is the control "
                  "(sequence-level IS, exact by construction):", ""]
        methods = [m for m in ordered(axis, "method", METHOD_ORDER) if m not in ("ppo_clip", "minirl")]
        body = []
        for m in ordered(axis, "mismatch", MISMATCH_ORDER):
            for agg in ordered(axis, "agg"):
                cells = [f"{fmt_ci(values(axis, 'rel_err', mismatch=m, agg=agg, method=x))} "
                         f"({fmt_ci(values(axis, 'cos', mismatch=m, agg=agg, method=x))})" for x in methods]
                body.append([m, agg, *cells])
        lines += _table(["sampler", "aggregation", *methods], body)
    lines += _staleness(f)
    return lines


def _length_note(setup: list[dict[str, Any]]) -> str:
    """The response length under π_old and the enumeration's cost, where the setup rows carry them."""
    if not all("mean_len_policy" in r for r in setup):
        return ""
    return (f"; completion length under π_old {fmt_ci(values(setup, 'mean_len_policy'), 3)} tokens (EOS included); at most "
            f"{max(values(setup, 'rows_per_prompt_max')):.0f} completions for one prompt; enumeration "
            f"{fmt_ci(values(setup, 'enum_s'), 2)} s per seed")


def _staleness(f: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for kind, title in (("fixed", "at the θ_{N−1} the uncorrected update reaches (same θ for every method)"),
                        ("trajectory", "at the θ_{N−1} each method's own update reaches")):
        sub = [r for r in select(f, kind=kind) if r.get("k", 0) == r.get("N", 1) - 1]
        if not sub:
            continue
        lines += [f"**Staleness, {title}**: relative error of the last mini-batch's expected gradient (cosine):", ""]
        methods = ordered(sub, "method", METHOD_ORDER)
        body = []
        for m in ordered(sub, "mismatch", MISMATCH_ORDER):
            for n in ordered(sub, "N", sort=int):
                for agg in ordered(sub, "agg"):
                    cells = [f"{fmt_ci(values(sub, 'rel_err', mismatch=m, N=n, agg=agg, method=x))} "
                             f"({fmt_ci(values(sub, 'cos', mismatch=m, N=n, agg=agg, method=x))})" for x in methods]
                    body.append([m, str(n), agg, *cells])
        lines += _table(["sampler", "N", "aggregation", *methods], body)
    after = select(f, kind="after")
    if after:
        lines += ["**Where each update goes** (sum aggregation): drift ‖θ − θ_old‖ and exact sequence KL(π_old ‖ π_θ) "
                  "per mini-batch step (after N steps, divided by N), and the change of the true objective J_S over the "
                  "whole update:", ""]
        body = []
        methods = ordered(after, "method", METHOD_ORDER)
        for m in ordered(after, "mismatch", MISMATCH_ORDER):
            for n in ordered(after, "N", sort=int):
                for x in methods:
                    a = select(after, mismatch=m, N=n, agg="sum", method=x)
                    gain = [r["J"] - r["J_old"] for r in a if "J_old" in r]
                    body.append([m, str(n), x, fmt_ci([r["drift"] / n for r in a]), fmt_ci([r["kl_seq"] / n for r in a]),
                                 fmt_ci(gain)])
        lines += _table(["sampler", "N", "method", "drift / step", "KL(π_old‖π_θ) / step", "ΔJ_S"], body)
    return lines


# ----------------------------------------------------------------------------- the other items


def routing_section(rows: list[dict[str, Any]]) -> list[str]:
    r = select(rows, item="routing")
    if not r:
        return []
    setup = select(r, kind="setup")
    lines = ["## 2. Routing Replay on the tiny MoE", "",
             f"FP8 sampler vs fp32 trainer at θ_old: routing agreement (per token and layer) "
             f"{fmt_ci(values(setup, 'none:routing/agreement'), 4)}, all layers {fmt_ci(values(setup, 'none:routing/agreement_all_layers'), 4)}; "
             f"mismatch k3 KL(μ ‖ π_old) without replay {fmt_ci(values(setup, 'k3_none'))}, with R3 {fmt_ci(values(setup, 'k3_R3'))}.", "",
             "Relative error of the last mini-batch's expected MiniRL gradient against ∇J_S of the policy's own routing "
             "(cosine), and the share of the routing at θ_{N−1} that still agrees with θ_old's:", ""]
    last = [x for x in select(r, kind="trajectory") if x["k"] == x["N"] - 1]
    replays = ordered(last, "replay", ("none", "R2", "R3"))
    body = []
    for n in ordered(last, "N", sort=int):
        cells = [f"{fmt_ci(values(last, 'rel_err', N=n, replay=x))} ({fmt_ci(values(last, 'cos', N=n, replay=x))})" for x in replays]
        body.append([str(n), *cells, fmt_ci(values(last, "agreement_with_old", N=n, replay="none"), 4)])
    return lines + _table(["N", *replays, "routing agreement θ_{N−1} vs θ_old"], body)


def _per_seed_means(rows: list[dict[str, Any]], key: str) -> list[float]:
    """One value per seed (the mean over its steps), so the interval is over seeds, not steps."""
    return [mean_ci(values(rows, key, seed=seed))[0] for seed in ordered(rows, "seed")]


def capo_section(rows: list[dict[str, Any]]) -> list[str]:
    c = select(rows, item="capo")
    lines: list[str] = []
    if c:
        steps, summ = select(c, kind="step"), select(c, kind="summary")
        lines += ["## 3. CAPO: realised per-step policy shift, and what the mask rejects", "",
                  "Per optimizer step, on held-out contexts: KL(π_before ‖ π_after) per position (mean over steps of the "
                  "mean / p99 / max over positions), and the share of training tokens the official rule rejects "
                  "(for nomask: would reject):", ""]
        body = []
        for lr in ordered(c, "lr", sort=float):
            for v in ordered(c, "variant", ("nomask", "capo", "capo_true")):
                s = select(steps, lr=lr, variant=v)
                body.append([f"{lr:g}", v, *(fmt_ci(_per_seed_means(s, k)) for k in ("heldout_kl_mean", "heldout_kl_p99",
                             "heldout_kl_max")), fmt_ci(values(summ, "rejected_frac", lr=lr, variant=v))])
        lines += _table(["lr", "variant", "KL mean", "KL p99", "KL max", "rejected"], body)
        lines += ["Per training token (all LRs pooled per run): Spearman correlation of the predicted scores with the "
                  "realised change, rejection rate by advantage sign and by the sampled token's probability, and the "
                  "median ratio of the sampled-token to the full (true) Fisher form of m_F:", ""]
        bins = [k.removeprefix("rejected_rate_") for k in summ[0] if k.startswith("rejected_rate_p")]
        body = []
        for v in ordered(summ, "variant", ("nomask", "capo", "capo_true")):
            s = select(summ, variant=v)
            body.append([v, fmt_ci(values(s, "spearman_fisher_sampled_kl"), 2), fmt_ci(values(s, "spearman_fisher_full_kl"), 2),
                         fmt_ci(values(s, "spearman_hessian_change"), 2), fmt_ci(values(s, "rejected_rate_adv_pos"), 2),
                         fmt_ci(values(s, "rejected_rate_adv_neg"), 2),
                         *[fmt_ci(values(s, f"rejected_rate_{b}"), 2) for b in bins]])
        lines += _table(["variant", "ρ(m_F samp, KL)", "ρ(m_F full, KL)", "ρ(m_H, Δobj)", "rej. Â>0", "rej. Â<0",
                         *[f"rej. {b}" for b in bins]], body)
        s = select(summ, variant="nomask")
        lines += _table(["p bin", *bins], [["m_F sampled / full (median)",
                                            *[fmt_ci(values(s, f"fisher_ratio_median_{b}"), 3) for b in bins]]])
    cc = select(rows, item="capo_collapse")
    if cc:
        lines += ["**Does the Fisher form explain the collapse at lr 1e-3?** The collapse map's CAPO cell, with both forms:", ""]
        body = []
        for m in ordered(cc, "method"):
            s = [x for x in select(cc, method=m) if x.get("collapsed") is not None]
            body.append([m, f"{sum(bool(x['collapsed']) for x in s)}/{len(s)}", fmt_ci(values(s, "final_acc"), 2),
                         fmt_ci(values(s, "best_acc"), 2), fmt_ci(values(s, "rejected_frac"), 2)])
        lines += _table(["recipe", "collapsed", "final acc", "best acc", "rejected frac"], body)
    return lines


def pcr_section(rows: list[dict[str, Any]]) -> list[str]:
    p = select(rows, item="pcr", kind="run")
    if not p:
        return []
    lines = ["## 4. PCR: plasticity against retention", "",
             "Held-out addition accuracy gain (plasticity), subtraction accuracy loss (retention), mean cosine of the "
             "RL and KL gradients on the MLP blocks, share of conflicting blocks, mean α:", ""]
    body = [[m, fmt_ci(values(p, "plasticity_gain", method=m), 2), fmt_ci(values(p, "retention_loss", method=m), 2),
             fmt_ci(values(p, "cos_mean", method=m), 2), fmt_ci(values(p, "conflict_frac_mean", method=m), 2),
             fmt_ci(values(p, "alpha_mean", method=m), 2)] for m in ordered(p, "method")]
    return lines + _table(["method", "plasticity gain", "retention loss", "cos(g_pla, g_sta)", "conflict frac", "α"], body)


def lco_section(rows: list[dict[str, Any]]) -> list[str]:
    s = select(rows, item="lco", kind="summary")
    if not s:
        return []
    lines = ["## 5. LCO: direction of the logit update, and roughness", "",
             "Fisher-metric cosine between each token's realised logit change and the direction to its target, on the "
             "on-policy and the stale mini-batch; share of tokens moved towards the target; relative roughness of the "
             "gradient norm; cosine of consecutive parameter updates; mean reward of the last step:", ""]
    body = [[m, *(fmt_ci(values(s, k, method=m), 2) for k in ("cos_on_policy", "cos_stale", "toward_frac",
                                                              "grad_norm_roughness", "update_cos_consecutive", "reward_last"))]
            for m in ordered(s, "method")]
    return lines + _table(["method", "cos on-policy", "cos stale", "towards", "roughness ‖g‖", "cos Δθ_t,Δθ_t−1", "reward"], body)


def guard_section(rows: list[dict[str, Any]]) -> list[str]:
    g = select(rows, item="guard")
    summ = select(g, kind="summary")
    if not summ:
        return []
    s = summ[0]
    lines = ["## 6. The guard, replayed on the collapse map's runs", "",
             f"{s['runs']} unguarded runs; {s['collapsed_or_dipped']} collapsed or dipped: alarm no later than the onset in "
             f"{s['caught_early']}, late in {s['caught_late']}, missed in {s['missed']}; lead times (updates) {s['lead_steps']}. "
             f"{s['healthy']} healthy runs: {s['false_alarms']} false alarm(s) (rate {s['false_alarm_rate']:.2f}).", ""]
    body = [[r["method"], f"{r['lr']:g}", str(r["seed"]), r["outcome"], str(r["onset"]), str(r["alarm"]), str(r["lead"]),
             "; ".join(r["reasons"])[:60]] for r in select(g, kind="run") if r["outcome"] != "quiet"]
    return lines + _table(["method", "lr", "seed", "outcome", "onset", "alarm", "lead", "first signal"], body)


def jobs_section(rows: list[dict[str, Any]]) -> list[str]:
    jobs = select(rows, kind="job")
    errors = [j for j in jobs if j.get("status") != "ok"]
    lines = ["## Jobs", "", f"{len(jobs)} jobs, {len(errors)} error(s); wall and CPU time by item (s, summed over jobs; "
             "the CPU time of the worker process, which does not grow when other programs share the cores):", ""]
    body = [[i, str(len(select(jobs, item=i))), f"{sum(values(jobs, 'wall_s', item=i)):.0f}",
             f"{sum(values(jobs, 'cpu_s', item=i)):.0f}"] for i in ordered(jobs, "item")]
    body.append(["all", str(len(jobs)), f"{sum(values(jobs, 'wall_s')):.0f}", f"{sum(values(jobs, 'cpu_s')):.0f}"])
    lines += _table(["item", "jobs", "wall s", "CPU s"], body)
    lines += [f"- ERROR {j['job']}: {j.get('error')}" for j in errors]
    return lines


def write_report(out: str | Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[Path]:
    from steadyrl.bench.figures_mechanisms import write_figures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(out, rows)
    machine = meta.get("machine", {})
    head = ["# Mechanism lab report", "",
            f"Setting: {meta.get('spec', {}).get('setting', 'short')}. "
            f"Command: `{meta.get('command', 'steadyrl bench mechanisms')}`; wall time {meta.get('wall_s', meta.get('run_wall_s', '?'))} s; "
            f"torch {machine.get('torch', '?')}, {machine.get('cpu_count', '?')} CPUs, load {machine.get('load_avg_start')} → "
            f"{machine.get('load_avg_end')}. Means over seeds ± 95 % t-interval. Protocol: docs/stability-lab.md "
            "(\"The mechanism lab\"); verdicts: docs/results/stability/claims.md.", ""]
    head += [f"![{p.stem}]({p.name})" for p in figures] + [""]
    body = [*formulation_section(rows), *routing_section(rows), *capo_section(rows), *pcr_section(rows),
            *lco_section(rows), *guard_section(rows), *jobs_section(rows)]
    path = out / "report.md"
    path.write_text("\n".join(head + body) + "\n")
    return [path, *figures]
