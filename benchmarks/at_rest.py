"""Memory held at rest between rounds: --mp against in-process, the same federation side by side.

    python benchmarks/at_rest.py [CLIENTS MIN SAMPLED ROUNDS] [--doc PATH]   (default 20 20 5 3)

Runs ./run.sh twice on this host, with --mp and with --no-mp, and reads each
run's memory.json: per round, what the run's processes hold at rest (on the
GPUs where NVML sees one, and host RSS always), how many clients hold memory
then, and how that compares. With --doc PATH it also writes the GPU validation
document of issue 4: the two runs' tables, ``fedgpu report A B``, and the key
numbers of each memory.png. Run outputs go to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, report, table

ROOT = Path(__file__).resolve().parent.parent
FEDGPU = ROOT / ".venv" / "bin" / "fedgpu"


def federation(run_dir: Path, shape: list[str], *extra: str) -> dict:
    done = subprocess.run([str(ROOT / "run.sh"), *shape, "--run-dir", str(run_dir), *extra], capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"at_rest: ./run.sh {' '.join(shape + list(extra))} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads((run_dir / "memory.json").read_text())


def at_rest(entry: dict, section: str, key: str) -> float | None:
    return (entry.get(section) or {}).get(key)


def node_rss(entry: dict) -> float | None:
    roles = (entry.get("host") or {}).get("at_rest_by_role_mib") or {}
    return roles.get("client-node")


def ratio(a: float | None, b: float | None) -> str:
    if not a or b is None:
        return "-"
    return f"{b / a:.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", nargs="*", default=["20", "20", "5", "3"], help="clients min sampled rounds")
    parser.add_argument("--doc", type=Path, default=None, help="also write the GPU validation document here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fedgpu-at-rest-"))
    runs = {"mp": workdir / "mp", "in-process": workdir / "in-process"}
    summaries = {"mp": federation(runs["mp"], args.shape),
                 "in-process": federation(runs["in-process"], args.shape, "--no-mp")}
    mp, base = summaries["mp"], summaries["in-process"]
    with_gpu = mp["gpu_available"] and base["gpu_available"]
    rows = []
    for a, b in zip(mp["rounds"], base["rounds"]):
        row = [a["round"]]
        if with_gpu:
            ga, gb = at_rest(a, "gpu", "at_rest_ours_mib"), at_rest(b, "gpu", "at_rest_ours_mib")
            row += [ga, gb, at_rest(a, "gpu", "clients_holding_at_rest"), at_rest(b, "gpu", "clients_holding_at_rest"),
                    at_rest(a, "gpu", "at_rest_holders"), at_rest(b, "gpu", "at_rest_holders")]
        na, nb = node_rss(a), node_rss(b)
        row += [na, nb, ratio(na, nb), at_rest(a, "host", "at_rest_total_mib"), at_rest(b, "host", "at_rest_total_mib")]
        rows.append(row)
    headers = ["round"]
    if with_gpu:
        headers += ["GPU at rest, --mp (MiB)", "GPU at rest, in-process", "clients holding GPU, --mp",
                    "clients holding GPU, in-process",
                    "GPU contexts at rest, --mp", "GPU contexts at rest, in-process"]
    headers += ["client nodes' RSS at rest, --mp (MiB)", "client nodes' RSS at rest, in-process", "in-process / --mp",
                "all processes' RSS at rest, --mp", "all, in-process"]
    note = "" if with_gpu else f"\n\n{mp['note']}: the comparison is of host memory only.\n"
    body = (
        f"`./run.sh {' '.join(args.shape)}` with `--mp` (zygote) and with `--no-mp`, one after the other. "
        "*At rest*: the last sample after a round ended and before the next round's first message child "
        "(memory.json). RSS counts shared pages in every process "
        "(torch's libraries among them).{note}\n\n".format(note=note)
        + table(headers, rows)
    )
    report("at_rest", "Memory at rest between rounds: --mp against in-process", body,
           {"shape": args.shape, "summaries": summaries, "runs": {k: str(v) for k, v in runs.items()}})
    if args.doc is not None:
        write_doc(args.doc, args.shape, runs, summaries, body)


def write_doc(path: Path, shape: list[str], runs: dict[str, Path], summaries: dict, body: str) -> None:
    def out(*argv: str) -> str:
        return subprocess.run([str(FEDGPU), *argv], capture_output=True, text=True, check=True).stdout.rstrip()

    sections = [f"# GPU validation (issue 4)\n\n{machine()}\n\n"
                f"Command: `benchmarks/at_rest.py {' '.join(shape)} --doc {path}`\n", body]
    for name, run_dir in runs.items():
        sections.append(f"## {name}: `fedgpu report`\n\n```text\n{out('report', str(run_dir))}\n```")
    sections.append("## Side by side: `fedgpu report MP IN_PROCESS`\n\n"
                    f"```text\n{out('report', str(runs['mp']), str(runs['in-process']))}\n```")
    keys = []
    for name, summary in summaries.items():
        rounds = summary["rounds"]
        peak = max(((r.get("gpu") or {}).get("peak_total_mib") or 0) for r in rounds)
        rest = [(r.get("gpu") or {}).get("at_rest_total_mib") for r in rounds]
        keys.append(f"- {name}: GPU peak {peak:.0f} MiB; GPU used at rest after each round {rest} MiB; "
                    f"host RSS peak {max(r['host']['peak_total_mib'] for r in rounds):.0f} MiB "
                    f"(memory.png of {runs[name]})")
    sections.append("## memory.png, key numbers\n\n" + "\n".join(keys))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(sections) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
