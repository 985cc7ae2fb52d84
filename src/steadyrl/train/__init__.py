"""The RL loop: one step is collect (prompts → rollout → reward → advantage), score (π_old, π_ref, MoE
routing) and update (mini-batches × micro-batches); ``Trainer`` runs steps, evals and checkpoints."""
