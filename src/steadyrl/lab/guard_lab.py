"""Item 6 of the lab: the stability guard's lead time and false-alarm rate over the collapse map's runs.

The guard (steadyrl.stabilisers.guard) is replayed offline on every run of a collapse map's results.jsonl that ran
without it: ``StabilityGuard.observe`` gets each RL step's metrics in order. With no snapshot bound, a firing
signal is an *alarm* (never a rollback), so the replay shows when the guard would first have acted on the run
as it actually went. Only the series the results rows keep can be replayed: ``reward/mean`` and
``policy/entropy`` (so the reward-drop and entropy signals; grad-spike, ESS and KL need the run directories).

Per run: the first alarm step; the onset of the collapse, the first eval whose accuracy is below the collapse
threshold (``report.collapse.accuracy_threshold``), for runs the map judged collapsed (or that dipped). Both are
counted in policy states: the reward of RL step i is sampled from the policy after i − 1 updates, and the eval
at step s measures the policy after s updates, so the lead time is onset − (alarm − 1) updates (≥ 0: the guard
saw the state no later than the eval that first shows the collapse). A false alarm is an alarm in a run that
neither collapsed nor dipped. The eval interval (2 steps in the quick map) bounds the onset's resolution.
"""

from __future__ import annotations

import math
from typing import Any

from steadyrl.config import GuardConfig
from steadyrl.report.collapse import accuracy_threshold
from steadyrl.stabilisers.guard import StabilityGuard

GUARDED = ("grpo_guard",)


def first_alarm(reward: list[float], entropy: list[float], cfg: GuardConfig | None = None) -> tuple[int | None, tuple[str, ...]]:
    """(1-based RL step of the first alarm or None, its reasons) when the guard watches these series."""
    guard = StabilityGuard(cfg or GuardConfig())
    for i, (r, h) in enumerate(zip(reward, entropy), start=1):
        metrics = {"reward/mean": r, "policy/entropy": h}
        action = guard.observe(i, {k: v for k, v in metrics.items() if v is not None})
        if action.kind == "alarm":
            return i, action.reasons
    return None, ()


def collapse_onset(eval_steps: list[int], eval_acc: list[float]) -> int | None:
    """First eval step whose accuracy is below the collapse threshold of the run's start accuracy."""
    if not eval_acc:
        return None
    threshold = accuracy_threshold(eval_acc[0])
    for step, acc in zip(eval_steps[1:], eval_acc[1:]):
        if not math.isfinite(acc) or acc < threshold:
            return int(step)
    return None


def replay_run(row: dict[str, Any], cfg: GuardConfig | None = None) -> dict[str, Any]:
    curve = row.get("curve", {})
    alarm, reasons = first_alarm(curve.get("reward", []), curve.get("entropy", []), cfg)
    onset = collapse_onset(curve.get("eval_steps", []), curve.get("eval_acc", []))
    collapsed = bool(row.get("collapsed"))
    bad = collapsed or onset is not None
    if bad:
        outcome = "missed" if alarm is None else ("early" if onset is None or alarm - 1 <= onset else "late")
    else:
        outcome = "false_alarm" if alarm is not None else "quiet"
    return {
        "item": "guard", "kind": "run", "method": row["method"], "lr": row["lr"], "seed": row["seed"],
        "collapsed": collapsed, "dipped": bool(row.get("dipped")), "onset": onset, "alarm": alarm,
        "reasons": list(reasons), "lead": (onset - (alarm - 1)) if (alarm is not None and onset is not None) else None,
        "outcome": outcome,
    }


def replay_map(rows: list[dict[str, Any]], cfg: GuardConfig | None = None) -> list[dict[str, Any]]:
    """Replay every unguarded run that finished (``collapsed`` judged) and summarise."""
    runs = [replay_run(r, cfg) for r in rows if r.get("method") not in GUARDED and r.get("collapsed") is not None]
    bad = [r for r in runs if r["outcome"] in ("early", "late", "missed")]
    good = [r for r in runs if r["outcome"] in ("false_alarm", "quiet")]
    leads = [r["lead"] for r in runs if r["outcome"] == "early" and r["lead"] is not None]
    summary = {
        "item": "guard", "kind": "summary", "runs": len(runs), "collapsed_or_dipped": len(bad),
        "caught_early": sum(r["outcome"] == "early" for r in bad), "caught_late": sum(r["outcome"] == "late" for r in bad),
        "missed": sum(r["outcome"] == "missed" for r in bad), "healthy": len(good),
        "false_alarms": sum(r["outcome"] == "false_alarm" for r in good),
        "false_alarm_rate": (sum(r["outcome"] == "false_alarm" for r in good) / len(good)) if good else math.nan,
        "lead_steps": sorted(leads), "lead_median": sorted(leads)[len(leads) // 2] if leads else None,
    }
    return runs + [summary]
