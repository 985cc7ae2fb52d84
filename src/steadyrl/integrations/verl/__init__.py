"""steadyrl's losses and advantage estimators inside verl, registered by verl itself (docs/integrations/verl.md).

``pip install 'steadyrl[verl]'`` declares the entry point ``verl.plugins: steadyrl = steadyrl.integrations.verl``;
``import verl`` (on the driver and in every Ray worker) imports this module, which registers

* every steadyrl loss as ``actor_rollout_ref.actor.policy_loss.loss_mode=steadyrl/<name>`` (``losses.py``),
  except ``status.VERL_LOSS_EXCLUDED``; hyper-parameters by steadyrl's names in the ``PolicyLossConfig``
  subclass ``SteadyPolicyLossConfig`` (``policy_loss._target_``);
* every steadyrl advantage estimator as ``algorithm.adv_estimator=steadyrl/<name>`` (``advantages.py``); one
  that reads π_old's per-token statistics (the optimal token baseline) as a refusal naming verl's own.

verl logs a plugin that fails to import at debug level and moves on, so the user would only see "Unsupported
loss mode". This module therefore never raises on import: a failure is logged at ERROR level with its cause,
and every ``steadyrl/<name>`` is registered as a stub that raises that cause when verl calls it.
``python -m steadyrl.integrations.verl`` runs the same self-check and prints what is registered.
"""

from __future__ import annotations

import contextlib
import logging

TESTED_VERL = ("0.9.1", "0.10")
"""verl versions this adapter was tested with: >= the first, < the second (pyproject's ``verl`` extra)."""

LOSS_PREFIX = "steadyrl/"
logger = logging.getLogger("steadyrl.integrations.verl")

registered_losses: list[str] = []
registered_advantages: list[str] = []
load_error: str | None = None
"""Why the plugin did not load (None when it did)."""


def check() -> None:
    """Raise the plugin's load failure, if any, as a RuntimeError naming the cause."""
    if load_error is not None:
        raise RuntimeError(load_error)


def install() -> tuple[list[str], list[str]]:
    """Register every carried loss and advantage estimator with verl; returns their verl names."""
    from steadyrl.integrations.verl.advantages import register_advantages
    from steadyrl.integrations.verl.losses import check_verl_api, register_losses

    check_verl_api()
    return register_losses(), register_advantages()


def _stub(name: str, cause: str):
    def unavailable(*args, **kwargs):
        raise RuntimeError(f"loss_mode={name} is unavailable: {cause}")

    return unavailable


def _install_or_explain() -> None:
    global load_error
    try:
        losses, advantages = install()
    except Exception as exc:  # noqa: BLE001 -- every failure must reach the user, whatever its type
        load_error = (
            f"steadyrl's verl plugin did not load ({type(exc).__name__}: {exc}). It is tested with "
            f"verl >= {TESTED_VERL[0]}, < {TESTED_VERL[1]}; reinstall with pip install 'steadyrl[verl]'."
        )
        logger.error(load_error)
        try:  # so that loss_mode=steadyrl/<name> names this cause instead of "Unsupported loss mode"
            from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

            from steadyrl import registry

            for name in registry.FAMILIES["loss"].table:
                POLICY_LOSS_REGISTRY.setdefault(LOSS_PREFIX + name, _stub(LOSS_PREFIX + name, load_error))
        except Exception:  # noqa: BLE001 -- the ERROR log above already names the cause
            pass
        return
    registered_losses[:] = losses
    registered_advantages[:] = advantages
    load_error = None


_install_or_explain()

# The _target_ of policy_loss; absent only when the plugin failed, which the ERROR log above explains.
with contextlib.suppress(Exception):
    from steadyrl.integrations.verl.losses import SteadyPolicyLossConfig  # noqa: F401
