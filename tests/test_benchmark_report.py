"""The latency report reads right: every plotted series in its legend, a title on every figure, the
gap between the stages and the end-to-end figure shown with its sign, too few runs said so."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from benchmarks import report

RESULT = Path(__file__).parents[1] / "benchmarks/results/2026-11-27-cpu-tiny-instantid/latency.json"


@pytest.fixture
def result() -> dict:
    return json.loads(RESULT.read_text())


def backend(result: dict, name: str) -> dict:
    return next(b for b in result["backends"] if b["name"] == name)


def test_gap_row_is_end_to_end_minus_its_stages(result):
    baseline = backend(result, "baseline")
    medians = {stage: stats["median"] for stage, stats in baseline["stages"].items()}
    expected = medians["end_to_end"] - sum(medians[s] for s in report.IN_END_TO_END)
    assert report.unaccounted(baseline) == pytest.approx(expected)
    assert expected < 0  # this committed run: the stages timed alone add up to more than one request
    row = next(line for line in report.markdown(result).splitlines() if line.startswith("| end_to_end − ("))
    assert row.split(" | ")[1] == "−" + report.fmt_seconds(-expected)
    assert "Each stage is timed alone" in report.markdown(result)


def test_too_few_runs_are_said_and_p90_hidden(result):
    assert not report.consistency_notes(result)  # 5 runs, loops longer than steps
    few = copy.deepcopy(result)
    few["config"]["runs"] = 1
    table = report.markdown(few)
    assert "too few for a median or a p90" in table and "--runs 3" in table
    denoise = next(line for line in table.splitlines() if line.startswith("| denoise_loop |"))
    assert denoise.count("(–)") == sum(b["available"] for b in few["backends"])


def test_loop_below_one_step_is_flagged(result):
    odd = copy.deepcopy(result)
    stages = backend(odd, "baseline")["stages"]
    stages["denoise_loop"]["median"] = stages["denoise_step"]["median"] / 2
    notes = report.consistency_notes(odd)
    assert len(notes) == 1 and notes[0].startswith("baseline: the 4-step loop's median is below one step's")


def legend_labels(fig) -> list[str]:
    return [text.get_text() for text in fig.axes[0].get_legend().get_texts()]


def test_every_series_is_in_the_legend_and_every_figure_titled(result):
    fig = report.stage_figure(result)
    labels = legend_labels(fig)
    assert set(report.STACKED) <= set(labels) and "measured: face analysis + end-to-end" in labels
    gaps = [report.unaccounted(b) for b in result["backends"] if b["available"]]
    assert ("outside the timed stages" in labels) == any(g > 0 for g in gaps)
    assert "where one request's time goes" in fig.axes[0].get_title()
    shorter = copy.deepcopy(result)
    for entry in shorter["backends"]:
        if entry["available"]:
            entry["stages"]["end_to_end"]["median"] = 0.0
    assert "outside the timed stages" not in legend_labels(report.stage_figure(shorter))
    sweep = report.sweep_figure(result)
    assert sweep.axes[0].get_title().endswith("end-to-end time vs size")
    plotted = {line.get_label() for line in sweep.axes[0].get_lines()}
    assert plotted == set(legend_labels(sweep)) and len(plotted) >= 2


def test_unreadable_result_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "latency.json"
    bad.write_text("{}")
    assert report.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "python -m benchmarks.latency" in err
