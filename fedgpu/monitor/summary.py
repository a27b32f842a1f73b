"""``memory.json``: per round, the peak and what is held at rest, from the
run's files alone (``memory.csv`` and ``events.jsonl``).

A round spans its round-start and round-end events (round-end comes after the
server's evaluation child is reaped). *At rest* after round r is the last
sample between round r's end and the first message child of round r+1 (or the
end of the timeline): every node idle, no message running. Where no sample
falls in that gap (the next round started within one sampling interval), the
first sample after it stands in, less the message children of later rounds it
caught: a child of the next round is not memory held at rest. Without a GPU the
same figures are given for host RSS only, and ``note`` says so.
"""

from __future__ import annotations

import csv
import math
import os
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedgpu.monitor.events import read_events
from fedgpu.monitor.memory import TIMELINE_FILE
from fedgpu.monitor.run_files import MAX_LINES_BYTES, NotRead, lines, open_run_file, read_json_file
from fedgpu.output import write_json

SUMMARY_FILE = "memory.json"
NOT_OURS = "other"
# Roles of the processes that run one message (memory.csv's role column): a round's own work, never at rest.
MESSAGE_CHILDREN = ("client-child", "server-child")

@dataclass
class Moment:
    """Everything sampled at one instant from one source (GPU or host)."""

    t: float
    total: float = 0.0  # gpu: used on the devices, everything; host: RSS of ours
    per_gpu: dict[str, float] = field(default_factory=dict)
    ours: float = 0.0
    holders: int = 0  # our processes holding memory (a GPU context, or any RSS)
    clients: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    client_holders: set[str] = field(default_factory=set)
    roles: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # (role, round, client, MiB) of each process of ours sampled: what ``without_children_after`` sorts.
    processes: list[tuple[str, int | None, str, float]] = field(default_factory=list)

    def add(self, role: str, server_round: int | None, client: str, used: float) -> None:
        """One process of ours, as memory.csv's row for it says."""
        self.processes.append((role, server_round, client, used))
        self.ours += used
        if used > 0:
            self.holders += 1
        self.roles[role] += used
        if client != "":
            self.clients[client] += used
            if used > 0:
                self.client_holders.add(client)

    def without_children_after(self, server_round: int) -> Moment:
        """This moment less the message children of rounds after ``server_round``."""
        def later(process: tuple[str, int | None, str, float]) -> bool:
            role, number, _, _ = process
            return role in MESSAGE_CHILDREN and number is not None and number > server_round

        if not any(later(process) for process in self.processes):
            return self
        moment = Moment(self.t, self.total - sum(process[3] for process in self.processes if later(process)),
                        dict(self.per_gpu))
        for process in self.processes:
            if not later(process):
                moment.add(*process)
        return moment


def read_timeline(run_dir: str, problems: list[str] | None = None) -> tuple[list[Moment], list[Moment]]:
    """(GPU moments, host moments), each in time order.

    Rows that cannot be read (a line cut short by a kill, bytes that are not
    text) are skipped and counted in ``problems``, one line each kind.
    """
    gpu: dict[float, Moment] = {}
    host: dict[float, Moment] = {}
    path = os.path.join(run_dir, TIMELINE_FILE)
    try:
        handle = open_run_file(path, MAX_LINES_BYTES)
    except FileNotFoundError:
        return [], []
    except (NotRead, OSError) as err:
        if problems is not None:
            problems.append(f"{TIMELINE_FILE}: not read: {err}")
        return [], []
    skipped = rows = 0
    last_cut = False
    overlong = [0]
    with handle:
        reader = csv.DictReader(line.decode(errors="replace") for line in lines(handle, overlong))
        try:
            columns = reader.fieldnames
        except csv.Error:
            columns = None
        if columns is None or "time" not in columns or "source" not in columns:
            if problems is not None:
                problems.append(f"{TIMELINE_FILE}: not a fedgpu memory timeline (no time and source columns)")
            return [], []
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:  # a field longer than csv reads
                rows += 1
                skipped += 1
                last_cut = False
                continue
            rows += 1
            try:
                if None in row.values() or None in row:  # fewer (or more) fields than columns: cut short
                    raise ValueError("cut short")
                t, used, source = float(row["time"]), float(row["used_mib"] or 0), str(row["source"])
                role, client = str(row["role"] or ""), str(row["client"] or "")
            except (KeyError, TypeError, ValueError):
                skipped += 1  # a line cut short by a crash, or not ours
                last_cut = True
                continue
            last_cut = False
            moments = gpu if source.startswith("gpu") else host
            moment = moments.setdefault(t, Moment(t))
            if source == "gpu":
                moment.total += used
                moment.per_gpu[str(row.get("gpu") or "")] = used
            elif source == "host":
                moment.total = used
            elif role != NOT_OURS:
                moment.add(role, _round_of(row.get("round")), client, used)
    rows += overlong[0]
    skipped += overlong[0]
    if skipped and problems is not None:
        cut = " (the last one cut short: the run was stopped mid-write)" if last_cut else ""
        problems.append(f"{TIMELINE_FILE}: {skipped} of {rows} rows unreadable and skipped{cut}")
    return [gpu[t] for t in sorted(gpu)], [host[t] for t in sorted(host)]


def _round_of(value: Any) -> int | None:
    """memory.csv's round column: a whole number, or None (no round, or not one)."""
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


@dataclass
class Timeline:
    """A run's memory.csv and events.jsonl, read once for the summary and the plot."""

    gpu: list[Moment]
    host: list[Moment]
    events: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: str) -> Timeline:
        gpu, host = read_timeline(run_dir)
        return cls(gpu, host, read_events(run_dir))

    def rounds(self) -> dict[int, tuple[float, float]]:
        """round -> (its round-start, its round-end or +inf if it never ended).

        A run whose ServerApp is not ours marks no rounds: there a round spans
        its client children, from the first one's start to the last one's end.
        """
        ends = {e["round"]: e["t"] for e in self.events if e.get("event") == "round-end"}
        spans = {e["round"]: (e["t"], ends.get(e["round"], math.inf))
                 for e in self.events if e.get("event") == "round-start"}
        if spans:
            return spans
        for event in self.events:
            number, kind = event.get("round"), event.get("event")
            if (not isinstance(number, int) or event.get("role") != "client-child"
                    or kind not in ("child-start", "child-end")):
                continue
            start, end = spans.get(number, (math.inf, -math.inf))
            spans[number] = (min(start, event["t"]), end) if kind == "child-start" else (start, max(end, event["t"]))
        return {number: (start, end if end >= start else math.inf)
                for number, (start, end) in spans.items() if start != math.inf}


def _window(moments: list[Moment], start: float, end: float) -> list[Moment]:
    times = [m.t for m in moments]
    return moments[bisect_left(times, start) : bisect_right(times, end)]


def _at_rest(moments: list[Moment], start: float, end: float, server_round: int) -> Moment | None:
    """The at-rest moment after ``server_round``: the last sample in [start, end], else the first after
    ``start``, which (taken once the next round began) is counted without that round's children."""
    inside = _window(moments, start, end)
    if inside:
        return inside[-1].without_children_after(server_round)
    after = moments[bisect_left([m.t for m in moments], start):]
    return after[0].without_children_after(server_round) if after else None


def _peaks(moments: list[Moment]) -> dict[str, Any]:
    clients: dict[str, float] = defaultdict(float)
    for moment in moments:
        for client, used in moment.clients.items():
            clients[client] = max(clients[client], used)
    return {
        "peak_total_mib": round(max((m.total for m in moments), default=0.0), 1),
        "peak_ours_mib": round(max((m.ours for m in moments), default=0.0), 1),
        "peak_holders": max((m.holders for m in moments), default=0),
        "per_client_peak_mib": {c: round(v, 1)
                                for c, v in sorted(clients.items(), key=lambda kv: _client_order(kv[0]))},
        "samples": len(moments),
    }


def _rest(moment: Moment | None) -> dict[str, Any]:
    if moment is None:
        return {"at_rest_total_mib": None, "at_rest_ours_mib": None, "at_rest_holders": None,
                "clients_holding_at_rest": None}
    return {
        "at_rest_total_mib": round(moment.total, 1),
        "at_rest_ours_mib": round(moment.ours, 1),
        "at_rest_holders": moment.holders,
        "clients_holding_at_rest": len(moment.client_holders),
        "at_rest_by_role_mib": {role: round(v, 1) for role, v in sorted(moment.roles.items())},
    }


def _number(value: Any) -> float:
    """A figure of an event; 0 where the event (damaged, or not ours) has none that is a number."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _is_gpu(gpu: Any) -> bool:
    """A GPU as the monitor-start event lists it."""
    return isinstance(gpu, dict) and isinstance(gpu.get("total_mib"), (int, float)) and {"index", "name"} <= gpu.keys()


def _client_order(client: str) -> tuple[int, str]:
    return (int(client), "") if client.isdigit() else (1 << 30, client)


def summarise(run_dir: str, timeline: Timeline | None = None) -> dict[str, Any]:
    timeline = timeline or Timeline.load(run_dir)
    gpu, host, events = timeline.gpu, timeline.host, timeline.events
    monitor = next((e for e in events if e.get("event") == "monitor-start"), {})
    spans = timeline.rounds()
    first_child: dict[int, float] = {}
    child_peaks: dict[str, dict[int, dict[str, float]]] = {"gpu": defaultdict(dict), "host": defaultdict(dict)}
    waits: dict[int, list[float]] = defaultdict(list)
    for event in events:
        kind, rnd = event.get("event"), event.get("round")
        if kind == "child-start" and event.get("role") != "server-child" and isinstance(rnd, int):
            first_child[rnd] = min(first_child.get(rnd, math.inf), event["t"])
        elif kind == "child-end" and isinstance(rnd, int) and event.get("client", "") != "":
            client = str(event["client"])
            for source, field_name in (("gpu", "gpu_peak_mib"), ("host", "rss_peak_mib")):
                peaks = child_peaks[source][rnd]
                peaks[client] = max(peaks.get(client, 0.0), _number(event.get(field_name)))
        elif kind == "admission-wait" and isinstance(rnd, int):
            waits[rnd].append(_number(event.get("seconds")))

    rounds = []
    for rnd in sorted(spans):
        start, end = spans[rnd]
        rest_until = first_child.get(rnd + 1, spans.get(rnd + 1, (math.inf,))[0])
        entry: dict[str, Any] = {"round": rnd, "seconds": None if end == math.inf else round(end - start, 3)}
        if gpu:
            during = _window(gpu, start, end)
            entry["gpu"] = _peaks(during) | _rest(_at_rest(gpu, end, rest_until, rnd) if end != math.inf else None)
            entry["gpu"]["peak_total_per_gpu_mib"] = {
                index: round(max(m.per_gpu.get(index, 0.0) for m in during), 1) for index in sorted(gpu[0].per_gpu)
            } if during else {}
        host_rest = _at_rest(host, end, rest_until, rnd) if end != math.inf else None
        entry["host"] = _peaks(_window(host, start, end)) | _rest(host_rest)
        # A child shorter than a sampling interval is seen by its own measurement.
        for source in ("gpu", "host") if gpu else ("host",):
            clients = entry[source]["per_client_peak_mib"]
            for client, peak in child_peaks[source].get(rnd, {}).items():
                clients[client] = round(max(clients.get(client, 0.0), peak), 1)
            entry[source]["per_client_peak_mib"] = dict(sorted(clients.items(), key=lambda kv: _client_order(kv[0])))
        entry["admission"] = {"waits": len(waits.get(rnd, [])), "wait_seconds": round(sum(waits.get(rnd, [])), 3)}
        rounds.append(entry)

    before = first_child.get(1, spans.get(1, (math.inf,))[0])
    idle_before = {
        "gpu": _rest(_at_rest(gpu, -math.inf, before, 0)) if gpu else None,
        "host": _rest(_at_rest(host, -math.inf, before, 0)),
    }
    all_waits = [s for values in waits.values() for s in values]
    no_gpu = monitor.get("no_gpu") if monitor else "no monitor-start event"
    return {
        "gpu_available": bool(gpu) and not no_gpu,
        "note": None if gpu and not no_gpu else f"no GPU ({no_gpu}): memory figures are host RSS only",
        "gpus": ([gpu for gpu in monitor.get("gpus") or [] if _is_gpu(gpu)]
                 if isinstance(monitor.get("gpus"), list) else []),
        "client_isolation": sorted({str(e.get("isolation")) for e in events
                                    if e.get("event") in ("node-start", "simulation-start")}),
        "samples": {"gpu": len(gpu), "host": len(host), "gpu_interval_s": monitor.get("gpu_interval_s")},
        "what": {
            "total": "gpu: memory used on the devices by every process; host: RSS summed over the run's processes",
            "ours": "memory of the run's processes (per process: NVML's compute-process list, or RSS)",
            "holders": "the run's processes holding memory (on a GPU: a CUDA context)",
            "at_rest": "the last sample after the round ended and before the next round's first message child "
                       "(none there: the first sample after, less the next round's children)",
        },
        "before_round_1": idle_before,
        "rounds": rounds,
        "admission": {"waits": len(all_waits), "wait_seconds": round(sum(all_waits), 3)},
    }


def write_summary(run_dir: str, timeline: Timeline | None = None) -> dict[str, Any]:
    summary = summarise(run_dir, timeline)
    write_json(os.path.join(run_dir, SUMMARY_FILE), summary)
    return summary


def load_summary_checked(
    run_dir: str, check: Callable[[dict[str, Any]], str | None] | None = None
) -> tuple[dict[str, Any] | None, list[str]]:
    """(the run's memory summary or None if nothing is usable, one-line problems found on the way).

    memory.json when it is one of ours (and ``check`` finds nothing wrong with
    it: it returns why not); else derived from memory.csv and events.jsonl,
    with what could not be read said and skipped. Every file is read as
    ``open_run_file`` reads: a symbolic link, a FIFO or a device is not read.
    """
    problems: list[str] = []
    path = os.path.join(run_dir, SUMMARY_FILE)
    if os.path.lexists(path):
        try:
            summary = read_json_file(path)
            why_not = (check(summary) if check is not None else None) if is_summary(summary) else ""
            if why_not is None:
                return summary, problems
            problems.append(f"{SUMMARY_FILE}: not a fedgpu memory summary{f' ({why_not})' if why_not else ''} "
                            "(ignored)")
        except NotRead as err:
            problems.append(f"{SUMMARY_FILE}: not read: {err}; derived again from {TIMELINE_FILE}")
        except (OSError, ValueError) as err:
            problems.append(f"{SUMMARY_FILE}: unreadable ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); derived again from {TIMELINE_FILE}")
    timeline = Timeline(*read_timeline(run_dir, problems), read_events(run_dir, problems))
    if not timeline.gpu and not timeline.host:
        if (os.path.lexists(os.path.join(run_dir, TIMELINE_FILE))
                and not any(p.startswith(TIMELINE_FILE) for p in problems)):
            problems.append(f"{TIMELINE_FILE}: no sample in it")
        return None, problems
    return summarise(run_dir, timeline), problems


def is_summary(value: Any) -> bool:
    """Whether a JSON value is a memory summary as ``summarise`` writes it."""
    if not isinstance(value, dict) or not isinstance(value.get("rounds"), list) or "before_round_1" not in value:
        return False
    return all(
        isinstance(entry, dict) and isinstance(entry.get("round"), int) and isinstance(entry.get("host"), dict)
        and isinstance(entry.get("admission"), dict)
        for entry in value["rounds"]
    )
