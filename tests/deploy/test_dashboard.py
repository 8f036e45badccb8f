"""deploy/grafana-dashboard.json: valid JSON in Grafana's dashboard model, and every series it
queries is one the service exports (so a renamed metric fails here, not on a blank panel)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from service.api.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exported_series() -> set[str]:
    """The series names a replica's /metrics can hold (process_* from one process)."""
    names = set()
    for family in Metrics().registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def test_the_dashboard_queries_exported_series_only() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exported = exported_series()
    queried = set()
    for panel in panels:
        assert {"type", "title", "gridPos", "targets"} <= set(panel), panel.get("title")
        for target in panel["targets"]:
            queried |= set(re.findall(r"\b((?:geoloc|process)_[a-z_]+)", target["expr"]))
    assert queried, "no series queried"
    assert queried <= exported, queried - exported
    assert {"geoloc_verdicts_total", "geoloc_stage_duration_seconds_bucket"} <= queried
