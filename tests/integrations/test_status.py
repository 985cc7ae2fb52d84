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
    rows = {(family, name) for family, name, *_ in status.status_rows()}
    for family, table in (("loss", registry.LOSSES), ("advantage", registry.ADVANTAGES),
                          ("correction", registry.CORRECTIONS), ("aggregation", registry.AGGREGATIONS)):
        assert {(family, n) for n in table} <= rows
    named = [*status.VERL_LOSS_EXCLUDED, *status.VERL_LOSS_LIMITS, *status.TRL_LOSS_LIMITS]
    assert set(named) <= set(registry.LOSSES), "an exclusion names a loss the registry no longer has"
    assert all(reason for reason in status.VERL_LOSS_EXCLUDED.values())
