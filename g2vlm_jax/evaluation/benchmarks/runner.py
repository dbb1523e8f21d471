"""`run_benchmark`: evaluates a suite unit by unit, resumably, on one or many processes, and writes the report.

    OUT/units/<unit>.json   one file per finished unit: {suite, unit, protocol, rows}, written atomically
                            (a temporary file renamed into place), so a killed run leaves only whole files
                            and the same command continues with the units that have none
    OUT/report.json         suite, data dir, checkpoint, frame width, protocol, unit counts and the table
                            {row label: {column: value}} of suite.summarize over every unit's rows
    OUT/report.md           the table laid out as the paper's (rows x suite.columns, plus their mean)

Process i of n (jax.process_index / process_count) evaluates units i, i+n, ...; then the processes meet
(meeting.wait) and process 0 reads every unit file and writes the report, so the report of n processes
is the report of one. A unit file written under another suite or protocol is refused (one --out per
suite and protocol), never mixed in.
"""
from __future__ import annotations

import glob
import json
import math
import os
import pathlib

import jax

from g2vlm_jax import meeting
from g2vlm_jax.console import progress
from g2vlm_jax.evaluation.benchmarks.base import Predictor, Suite


def unit_file(out_dir: pathlib.Path, unit: str) -> pathlib.Path:
    """OUT/units/<unit>.json; a '/' in a unit name (7-Scenes 'chess/seq-03') becomes '__'."""
    return pathlib.Path(out_dir) / "units" / (unit.replace("/", "__") + ".json")


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Writes `text` to a temporary file beside `path`, then renames it over `path` (all or nothing)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_unit(path: pathlib.Path, suite: Suite) -> list[dict]:
    """The rows of a finished unit file, checked to belong to this suite and protocol."""
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable unit result ({e}); delete it to evaluate that unit again") from None
    protocol = json.loads(json.dumps(suite.protocol()))  # as it reads back from JSON (tuples become lists)
    if done.get("suite") != suite.name or done.get("protocol") != protocol:
        raise ValueError(f"{path} holds results of suite {done.get('suite')!r} with protocol {done.get('protocol')}, "
                         f"not {suite.name!r} with {protocol}; pass another --out for this benchmark")
    return done["rows"]


def evaluate_units(suite: Suite, predictor: Predictor, data_dir: pathlib.Path, out_dir: pathlib.Path,
                   units: list[str], *, show_progress: bool = True) -> int:
    """Evaluates the `units` that have no result file yet; returns how many it evaluated."""
    files = {u: unit_file(out_dir, u) for u in units}
    for u, path in files.items():
        if path.exists():
            _read_unit(path, suite)  # a finished unit of another suite / protocol is refused before any work
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # a write killed before its rename;
            stale.unlink()  # only this process writes its units, so no other process is writing this one
    todo = [u for u in units if not files[u].exists()]
    bar = progress(total=len(units), initial=len(units) - len(todo), desc=suite.name, unit="unit",
                   disable=None if show_progress else True)
    for u in todo:
        rows = suite.evaluate(predictor, data_dir, u)
        record = {"suite": suite.name, "unit": u, "protocol": suite.protocol(), "rows": rows}
        write_atomically(files[u], json.dumps(record, default=_json_number))
        bar.update()
    bar.close()
    return len(todo)


def _json_number(x):
    """numpy scalars in result rows -> Python numbers."""
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} in a benchmark result row is not JSON-serialisable")


def build_report(suite: Suite, data_dir: pathlib.Path, out_dir: pathlib.Path, units: list[str], *,
                 checkpoint: str = "", frame_width: int | None = None, all_units: int | None = None) -> dict:
    """The report of the finished `units` (every one must have its file)."""
    missing = [u for u in units if not unit_file(out_dir, u).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(units)} units have no result in {out_dir / 'units'} (e.g. "
                           f"{missing[0]}): a process stopped early; run the same command again to finish them")
    rows = [row for u in units for row in _read_unit(unit_file(out_dir, u), suite)]
    return {"suite": suite.name, "kind": suite.kind, "source": suite.source, "data_dir": str(data_dir),
            "checkpoint": checkpoint, "frame_width": frame_width, "protocol": suite.protocol(), "columns": list(suite.columns),
            "units": len(units), "units_in_dataset": len(units) if all_units is None else all_units,
            "rows": len(rows), "table": suite.summarize(rows)}


def report_markdown(report: dict) -> str:
    """The report's table in markdown: one row per table row, suite.columns, and a 'mean' row when there are
    several rows (the paper's average column/row)."""
    columns, table = report["columns"], dict(report["table"])
    if len(table) > 1:
        table["mean"] = {c: _mean([values.get(c, math.nan) for values in table.values()]) for c in columns}
    partial = (f" (first {report['units']} of {report['units_in_dataset']} units: --max-units)"
               if report["units"] < report["units_in_dataset"] else "")
    lines = [f"# {report['suite']}", "",
             f"Data: `{report['data_dir']}`; checkpoint: `{report['checkpoint'] or '-'}`"
             f"{'' if report['frame_width'] is None else ' at width ' + str(report['frame_width'])}; {report['units']} units, "
             f"{report['rows']} result rows{partial}. Protocol: {report['source']}.", "",
             "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, values in table.items():
        lines.append(f"| {label} | " + " | ".join(_cell(values.get(c, math.nan)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _cell(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def check_max_units(max_units: int | None) -> None:
    if max_units is not None and max_units < 1:
        raise ValueError(f"--max-units {max_units}: must be >= 1 (omit it for every unit)")


def run_benchmark(suite: Suite, predictor: Predictor, data_dir, out_dir, *, max_units: int | None = None,
                  checkpoint: str = "", process_index: int | None = None, process_count: int | None = None) -> dict | None:
    """Evaluates `suite` on the dataset at `data_dir` into `out_dir` (module docstring); returns the report on
    process 0 and None on the others. `max_units`: only the first N units (a quick check; the report says
    so). `process_index` / `process_count` default to jax's (tests inject them)."""
    data_dir, out_dir = pathlib.Path(data_dir), pathlib.Path(out_dir)
    check_max_units(max_units)
    units = suite.units(data_dir)  # a wrong layout fails here, before anything is written
    if not units:
        raise ValueError(f"{data_dir} holds no units of suite {suite.name}; check --data")
    selected = units[:max_units] if max_units else units
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    (out_dir / "units").mkdir(parents=True, exist_ok=True)
    evaluate_units(suite, predictor, data_dir, out_dir, selected[index::count], show_progress=index == 0)
    meeting.wait(f"benchmark {suite.name}: every unit evaluated")
    if index != 0:
        return None
    report = build_report(suite, data_dir, out_dir, selected, checkpoint=checkpoint,
                          frame_width=getattr(predictor, "width", None), all_units=len(units))
    write_atomically(out_dir / "report.json", json.dumps(report, indent=1))
    write_atomically(out_dir / "report.md", report_markdown(report))
    return report
