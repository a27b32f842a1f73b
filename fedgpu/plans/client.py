"""``fedgpu client``: every option checked into a :class:`~fedgpu.flower.node.NodePlan`.

TLS and the node's key, GPU placement, the partition, the SuperLink's
address, the task, the node config, and the shared zygote (which must be
ours and prove it) are checked before the node starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedgpu.errors import BadInput
from fedgpu.flower.node import NodePlan, NodeSettings
from fedgpu.net import is_host_port


def plan_node(options: dict[str, Any]) -> NodePlan:
    """Check every option of ``fedgpu client`` before anything starts; BadInput names the first problem."""
    from fedgpu.flower.config import check_node_config
    from fedgpu.isolation.procs import watch_parent
    from fedgpu.nvml.placement import check_placement

    watch_parent(options["parent_pid"])
    if options["auth_private_key"] and not options["root_certificates"]:
        raise BadInput("--auth-private-key needs TLS (--root-certificates)")
    placement = check_placement(options, children=bool(options["mp"]))
    if int(options["partition_id"]) >= int(options["num_partitions"]):
        raise BadInput(f"--partition-id {options['partition_id']} "
                       f"must be below --num-partitions {options['num_partitions']}")
    superlink = str(options["superlink"])
    if not is_host_port(superlink):
        raise BadInput(f"--superlink {superlink!r} is not HOST:PORT")
    node_config: dict[str, object] = {"partition-id": options["partition_id"],
                                      "num-partitions": options["num_partitions"]}
    if options["task"]:
        from fedgpu.tasks import UnknownTaskError, resolve_task

        try:
            resolve_task(str(options["task"]))
        except UnknownTaskError as err:
            raise BadInput(str(err)) from None
        node_config["task"] = options["task"]
    node_config.update(check_node_config(str(options["node_config"])))
    zygote_dir = options["zygote_dir"]
    isolation = str(options["isolation"]) if options["mp"] else "none"
    if zygote_dir and isolation == "zygote" and not options["check"]:
        check_shared_zygote(str(zygote_dir))
    settings = NodeSettings(
        superlink=superlink,
        node_config=node_config,
        isolation=isolation,
        zygote=zygote_dir,
        timeout=options["timeout"],
        runtime_port=options["runtime_port"],
        max_wait_time=float(options["max_wait_time"]),
        root_certificates=_absolute(options["root_certificates"]),
        auth_private_key=_absolute(options["auth_private_key"]),
    )
    return NodePlan(settings, placement if options["mp"] else None)


def check_shared_zygote(directory: str, ready_timeout: float = 300.0) -> None:
    """The shared zygote exists, is ours and proves it (waiting for it to be ready); else BadInput."""
    from fedgpu.isolation.zygote import ZygoteError, ZygoteLauncher

    if not os.path.lexists(directory):
        raise BadInput(f"--zygote {directory}: no such directory (start `fedgpu zygote --dir {directory}` first)")
    try:
        ZygoteLauncher(directory).check(ready_timeout)
    except ZygoteError as err:
        raise BadInput(f"--zygote {directory}: {err}") from None


def _absolute(path: object) -> str | None:
    return str(Path(str(path)).absolute()) if path else None
