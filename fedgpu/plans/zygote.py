"""``fedgpu zygote``: its options checked into a :class:`~fedgpu.flower.zygote_command.ZygotePlan`."""

from __future__ import annotations

import json

from fedgpu.flower.warm_ups import app_warm_ups, zygote_warm_ups
from fedgpu.flower.zygote_command import ZygotePlan


def plan_zygote(directory: str, tasks: tuple[str, ...], app_dir: str | None, parent_pid: int | None, *,
                run_data: str | None = None) -> ZygotePlan:
    """Check every option of ``fedgpu zygote``; BadInput names the first problem."""
    import os
    import sys

    from fedgpu.errors import BadInput
    from fedgpu.isolation.procs import pythonpath_with_package, watch_parent
    from fedgpu.isolation.zygote import ZygoteError
    from fedgpu.isolation.zygote.start import prepare_directory

    watch_parent(parent_pid)
    path = pythonpath_with_package()
    extra_env: dict[str, str] = {}
    if app_dir:
        from fedgpu.flower.app import AppError, FlowerApp

        if tasks:
            raise BadInput("--app and --task: a zygote warms up for one or the other")
        try:
            app = FlowerApp.read(app_dir)
        except AppError as err:
            raise BadInput(str(err)) from None
        warm_ups = app_warm_ups(app.client_module)
        path = os.pathsep.join([str(app.directory), path])
        # Nothing is ever written into the user's app: the zygote and every child it forks import
        # the app's modules without writing __pycache__ beside them.
        extra_env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        from fedgpu.tasks import UnknownTaskError, resolve_task

        for task in tasks or ("digits",):
            try:
                resolve_task(task)
            except UnknownTaskError as err:
                raise BadInput(str(err)) from None
        warm_ups = zygote_warm_ups(*(tasks or ("digits",)))
        if run_data:
            try:
                wanted = json.loads(run_data)
                if wanted.get("task") not in (tasks or ("digits",)) or int(wanted["partitions"]) < 1:
                    raise ValueError
            except (ValueError, TypeError, KeyError, AttributeError):
                raise BadInput(
                    '--run-data: expected {"task": one of --task, "options": {...}, "partitions": N >= 1}'
                ) from None
            warm_ups.append(f"fedgpu.tasks.work:warm_up_run={json.dumps(wanted)}")
    try:  # the zygote checks again; here a bad path is one line before anything is imported
        prepare_directory(directory)
    except ZygoteError as err:
        raise BadInput(f"--dir {directory}: {err}") from None
    parent = ["--parent-pid", str(parent_pid)] if parent_pid else []
    argv = [sys.executable, "-m", "fedgpu.isolation.zygote", "--dir", directory, *parent, *warm_ups]
    return ZygotePlan(argv, {**extra_env, "PYTHONPATH": path})
