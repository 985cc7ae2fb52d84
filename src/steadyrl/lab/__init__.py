"""The mechanism lab: measure, at small scale, the quantity each seed method claims to control.

    steadyrl bench mechanisms --quick

Pure measurements live here (enumeration of the response space, gradient fidelity, realised policy shift,
...); ``trainer_adapter`` is the one place that calls into the trainer's update stage. The runner and the
report are ``steadyrl.bench.mechanisms`` / ``steadyrl.bench.report_mechanisms``; the protocol is in
docs/stability-lab.md ("The mechanism lab") and the verdicts in docs/results/stability/claims.md.
"""
