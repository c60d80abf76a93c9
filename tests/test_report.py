"""`mtser report`: PNG figures and one self-contained HTML page for a finished search."""
from __future__ import annotations

import base64
import json
import re

from typer.testing import CliRunner

from mtser.cli.main import app
from search_support import ray_module, search_run  # noqa: F401 (fixtures)

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_writes_figures_and_self_contained_html(search_run, demo_store):
    run, summary = search_run
    runner = CliRunner()
    assert runner.invoke(app, ["ensemble", "--run", str(run), "--store", str(demo_store)]).exit_code == 0
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    folder = run / "report"
    for name in ("confusion", "heatmap", "scatter", "curves"):
        assert (folder / f"{name}.png").read_bytes().startswith(PNG), name
    page = (folder / "index.html").read_text()
    images = re.findall(r'<img alt="[^"]+" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4 and all(base64.b64decode(i).startswith(PNG) for i in images)
    assert not re.search(r'src="(?!data:)', page) and "<link" not in page       # nothing external
    for trial in summary.table["trial"]:
        assert trial in page
    dev = json.loads((run / "ensemble" / "ensemble.json").read_text())["metrics"]["Development"]
    assert "ensemble metrics" in result.output and f"{dev['f1']:.4f}" in result.output


def test_report_of_a_folder_without_results_names_what_is_missing(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "results.csv" in result.output
