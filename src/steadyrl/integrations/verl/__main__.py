"""``python -m steadyrl.integrations.verl``: load verl (and with it this plug-in) and say what verl now resolves."""

from __future__ import annotations

import sys


def main() -> int:
    import verl
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    import steadyrl.integrations.verl as plugin
    from steadyrl.integrations import status

    if plugin.load_error is not None:
        print(plugin.load_error, file=sys.stderr)
        return 1
    losses = sorted(k for k in POLICY_LOSS_REGISTRY if k.startswith(plugin.LOSS_PREFIX))
    advantages = sorted(k for k in ADV_ESTIMATOR_REGISTRY if k.startswith(plugin.LOSS_PREFIX))
    print(f"verl {verl.__version__}: steadyrl's plug-in is loaded.")
    print(f"actor_rollout_ref.actor.policy_loss.loss_mode: {', '.join(losses)}")
    print(f"algorithm.adv_estimator: {', '.join(advantages)}")
    for name, why in status.VERL_LOSS_EXCLUDED.items():
        print(f"not carried: {name} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
