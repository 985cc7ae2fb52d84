"""Stateful stabilisers that act outside the per-token loss: token filters (CAPO), gradient combiners
(PCR, PCGrad), the stability guard and the retention set. Each owns its state (``state_dict`` /
``load_state_dict``); the math they use lives in ``steadyrl.ops``."""
