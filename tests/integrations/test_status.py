"""The status table of docs/integrations/README.md is the one the registry and the adapters' exclusions give.

Run: .venv/bin/python -m pytest -q tests/integrations/test_status.py
"""

from __future__ import annotations

from pathlib import Path

from steadyrl import registry
from steadyrl.integrations import status

README = Path(__file__).resolve().parents[2] / "docs/integrations/README.md"


def test_docs_table_matches_the_registry():
    text = README.read_text()
    table = text.split(status.BEGIN, 1)[1].split(status.END, 1)[0].strip()
    assert table == status.status_table(), (
        "docs/integrations/README.md is out of date with the registry; run "
        "`python -m steadyrl.integrations.status --write` and commit it."
    )


def test_every_registry_method_has_a_row_and_every_exclusion_names_a_real_method():
    rows = {(family, name): (verl, trl, why) for family, name, verl, trl, why in status.status_rows()}
    for family in registry.METHOD_FAMILIES:
        assert {(family, n) for n in registry.FAMILIES[family].table} <= set(rows), family
    named = {"loss": [*status.VERL_LOSS_EXCLUDED, *status.VERL_LOSS_LIMITS, *status.TRL_LOSS_LIMITS],
             "advantage": [*status.VERL_ADVANTAGE_LIMITS, *status.TRL_ADVANTAGE_LIMITS],
             "correction": [*status.VERL_CORRECTION_EXCLUDED]}
    for family, names in named.items():
        assert set(names) <= set(registry.FAMILIES[family].table), f"an exception names a {family} the registry lacks"
    for (_, _name), (verl, trl, why) in rows.items():  # every status short of "carried" says why, per framework
        assert (verl == status.CARRIED or "verl:" in why) and (trl == status.CARRIED or "TRL:" in why), _name


def test_a_correction_reads_the_sampler_when_it_refuses_a_batch_without_mu():
    """The probe behind TRL's use_vllm check: μ-based corrections need it, the entropy mask and OPSM (anchor π_old)
    do not."""
    reads = {n: status.reads_sampler(registry.resolve("correction", n)) for n in registry.CORRECTIONS}
    assert reads["token_tis"] and reads["icepop"] and reads["m2po"]
    assert not reads["high_entropy"] and not reads["opsm"]
