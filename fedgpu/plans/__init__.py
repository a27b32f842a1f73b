"""Every command's options, checked before anything starts: one module per command.

A plan is what a command will do, already checked; a problem is one
``BadInput`` line and exit 2, with nothing started and no directory made.
docs/cli.md's bad-input table is what this package does, row by row:

- ``run``: ``fedgpu run`` and ``./run.sh`` (shape, task or app, roles, simulation, GPUs, port, memory, run directory)
- ``server``: ``fedgpu server`` (TLS and node keys, GPUs, port, app or task, simulation, run directory)
- ``client``: ``fedgpu client`` (TLS, GPUs, partition, SuperLink address, task, node config, shared zygote)
- ``zygote``: ``fedgpu zygote`` (task or app, run data, its private directory)
- ``report``: ``fedgpu report`` (its run directories, read into the summaries it shows)
- ``bench_models``: ``fedgpu bench-models`` (models, device, image size, CSV path, GPUs)
- ``task``: one of fedgpu's tasks and its options, shared by ``run`` and ``server``

Checks that more than one command makes live once, where the thing checked
lives: ``--node-config`` in ``fedgpu.flower.config.check_node_config``, the
GPUs in ``fedgpu.nvml.placement.check_placement``, the run directory in
``fedgpu.run_dir.prepare_run_dir``, the shape in ``fedgpu.shape``.
This package sits on top: nothing below it imports it (tests/test_layers.py).
"""
