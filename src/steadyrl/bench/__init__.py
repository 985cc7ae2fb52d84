"""The stability lab: the collapse map (methods × learning rates × seeds) and its report.

    steadyrl bench stability --quick

report/collapse.py defines a collapse and the per-cell metrics, bench/stability.py runs the matrix,
bench/report_stability.py writes the report. docs/stability-lab.md is the protocol.
"""
