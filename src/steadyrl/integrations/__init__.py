"""steadyrl's methods inside other RL frameworks.

* ``steadyrl.integrations.verl``: a verl plugin (``pip install 'steadyrl[verl]'``), loaded by verl itself through
  the ``verl.plugins`` entry point: every carried loss as ``loss_mode=steadyrl/<name>``, every advantage
  estimator as ``adv_estimator=steadyrl/<name>`` (docs/integrations/verl.md).
* ``steadyrl.integrations.trl``: ``SteadyGRPOTrainer``, a TRL ``GRPOTrainer`` that takes steadyrl's methods by
  their YAML names (``pip install 'steadyrl[trl]'``, docs/integrations/trl.md).
* ``steadyrl.integrations.status``: what each framework carries, and why not where it does not.

Importing this package imports neither framework.
"""
