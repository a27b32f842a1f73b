"""``fedgpu report RUN [RUN_B]``: a run's memory per round, or two runs side by side."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 10 else f"{value:.1f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# (column header, section, key): the figures a round is judged by.
GPU_COLUMNS = [
    ("GPU peak MiB", "gpu", "peak_total_mib"),
    ("ours peak", "gpu", "peak_ours_mib"),
    ("contexts peak", "gpu", "peak_holders"),
    ("GPU at rest", "gpu", "at_rest_total_mib"),
    ("ours at rest", "gpu", "at_rest_ours_mib"),
    ("contexts at rest", "gpu", "at_rest_holders"),
    ("clients holding", "gpu", "clients_holding_at_rest"),
]
HOST_COLUMNS = [
    ("host peak MiB", "host", "peak_total_mib"),
    ("host at rest MiB", "host", "at_rest_total_mib"),
    ("processes peak", "host", "peak_holders"),
]


def _columns(*summaries: dict[str, Any]) -> list[tuple[str, str, str]]:
    with_gpu = all(summary.get("gpu_available") for summary in summaries)
    return (GPU_COLUMNS if with_gpu else []) + HOST_COLUMNS


def _value(entry: dict[str, Any], section: str, key: str) -> Any:
    return (entry.get(section) or {}).get(key)


def describe(name: str, summary: dict[str, Any]) -> str:
    gpus = ", ".join(f"GPU {g['index']} {g['name']} {g['total_mib']:.0f} MiB" for g in summary.get("gpus", []))
    isolation = "/".join(summary.get("client_isolation") or []) or "unknown"
    waits = summary.get("admission", {})
    return (f"{name}: client isolation {isolation}; {gpus or 'no GPU'}; "
            f"admission waits {waits.get('waits', 0)} ({waits.get('wait_seconds', 0):.1f} s)")


def one_run(name: str, summary: dict[str, Any]) -> str:
    columns = _columns(summary)
    headers = ["round", "seconds"] + [c[0] for c in columns] + ["waits"]
    rows = []
    before = summary.get("before_round_1") or {}
    rows.append(["idle"] + ["-"]
                + [(before.get(section) or {}).get(key) if "rest" in key or "holding" in key else None
                   for _, section, key in columns]
                + [None])
    for entry in summary.get("rounds", []):
        rows.append([entry["round"], entry.get("seconds")] + [_value(entry, s, k) for _, s, k in columns]
                    + [entry["admission"]["waits"]])
    lines = [describe(name, summary)]
    if summary.get("note"):
        lines.append(summary["note"])
    lines.append(table(headers, rows))
    return "\n".join(lines)


def two_runs(name_a: str, a: dict[str, Any], name_b: str, b: dict[str, Any]) -> str:
    columns = _columns(a, b)
    lines = [f"A = {describe(name_a, a)}", f"B = {describe(name_b, b)}"]
    for summary, label in ((a, "A"), (b, "B")):
        if summary.get("note"):
            lines.append(f"{label}: {summary['note']}")
    rounds_b = {entry["round"]: entry for entry in b.get("rounds", [])}
    headers = ["round", "figure", "A", "B", "B - A"]
    rows = []
    for entry in a.get("rounds", []):
        other = rounds_b.get(entry["round"])
        if other is None:
            continue
        for header, section, key in columns:
            va, vb = _value(entry, section, key), _value(other, section, key)
            diff = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
            rows.append([entry["round"], header, va, vb, diff])
    lines.append(table(headers, rows) if rows else "no round in common")
    return "\n".join(lines)


# What a summary whose figures are not what ``summarise`` writes raises in the tables.
DAMAGED = (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError)


def one_line(err: BaseException) -> str:
    """An error in one line: its type and its first line, cut at 200 characters."""
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text[:200]}"


def why_not_reportable(summary: dict[str, Any]) -> str | None:
    """Why this summary cannot be shown, in one line (values of the wrong type, nested too deeply), or None."""
    try:
        one_run("", summary)
        two_runs("", summary, "", summary)
    except DAMAGED as err:
        return one_line(err)
    return None


def report_text(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """The table for one run, or two side by side (B - A): ``runs`` as (name, summary), each reportable."""
    if len(runs) == 1:
        return one_run(*runs[0])
    (name_a, a), (name_b, b) = runs
    return two_runs(name_a, a, name_b, b)
