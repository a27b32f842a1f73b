"""Every name one fedgpu process sets for another: environment variables (fedgpu's, Flower's) and a record key.

A name that crosses a process boundary is written by one role and read by
another, so it lives here, where both import it, rather than in either
role's module. A leaf: it imports nothing, so every layer may import it
(``tests/test_layers.py`` holds it to that).
"""

# --- a run: set by the launcher, inherited by every process the run starts ---
RUN_DIR_ENV = "FEDGPU_RUN_DIR"  # where reports and events go
PRIVATE_DIR_ENV = "FEDGPU_PRIVATE_DIR"  # the run's owner-only directory (sockets, keys, copies)
RUN_TOKEN_ENV = "FEDGPU_RUN_TOKEN"  # every answer of this run's SuperLink carries it
PROG_ENV = "FEDGPU_PROG"  # how errors name us: run.sh sets "run.sh"
APP_CHECKED_ENV = "FEDGPU_APP_CHECKED"  # set by the launcher for its server: this app directory is checked

# --- the isolation core ---
ZYGOTE_ENV = "FEDGPU_ZYGOTE"  # a shared zygote's directory, for Isolator("zygote")
ZYGOTE_SPARES_ENV = "FEDGPU_ZYGOTE_SPARES"  # spare children the zygote keeps primed
CALL_MARKER = "FEDGPU_CALL"  # in every call child's environment, inherited by all it starts
IN_ISOLATED_CHILD = "FEDGPU_ISOLATED_CALL"  # a ClientApp call already runs in its own child

# --- GPU placement and measurement ---
ENV_GPUS = "FEDGPU_GPUS"
ENV_POLICY = "FEDGPU_PLACEMENT"
ENV_ESTIMATE = "FEDGPU_GPU_MEM_MIB"
ENV_TIMEOUT = "FEDGPU_ADMISSION_TIMEOUT"
ENV_LEDGER = "FEDGPU_LEDGER"
FEDGPU_GPU = "FEDGPU_GPU"  # the NVML index placement gave this child

# --- the Flower processes' pace ---
DOORBELLS_ENV = "FEDGPU_DOORBELLS"  # the SuperLink rings a node's doorbell when it has a message
PACE_ENV = "FEDGPU_NODE_PACE"  # "flower": keep Flower's own pace
NODES_WAIT_ENV = "FEDGPU_NODES_WAIT_SECONDS"  # `fedgpu server` sets it for a user's app: its --start-timeout

# --- Flower's own environment ---
FLWR_HOME_ENV = "FLWR_HOME"  # where Flower's CLI keeps its connections
# Quiet and predictable Flower processes everywhere below us.
FLOWER_DEFAULTS = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

# --- a reply's record: the node's stamp (child pid, seconds, peak RSS), read by the server's recorder ---
FEDGPU_RECORD = "fedgpu"

# --- marks in a ServerApp's output that `fedgpu server` reads (the ServerApp runs under Flower, in its own process) ---
ROUND_LINE_MARK = "[fedgpu] "  # a line of ours, echoed on the launcher's console
RUN_FAILED_MARK = "[fedgpu] run failed: "  # why a ServerApp of ours failed
TOO_FEW_NODES_MARK = RUN_FAILED_MARK + "too few nodes: "  # the server ends the run when a ServerApp says this
FAILURE_MARK = "fedgpu-failure: "  # a failed reply's fields, as JSON, for the report (never echoed)

# --- exit codes one process gives another ---
EXIT_TOO_FEW_NODES = 3  # a ServerApp (and so `fedgpu server`): fewer client nodes than the run needs, in time
