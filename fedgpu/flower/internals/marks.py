"""Lines of Flower's own output that fedgpu reads, where Flower offers no public way to ask (flwr 1.42).

Each is matched as text, so each lives here, beside the rest of what a new
Flower release may change.
"""

# What `flwr run` prints once the SuperLink accepted the run. Its JSON output (--format json) does
# not stream the run's log, and a submission retried after a missed deadline must not start twice.
RUN_STARTED_MARK = "Successfully started run"
# What Flower's SuperNode logs once its SuperLink accepted it (its log is all a launcher has of it).
SUPERNODE_REGISTERED_MARK = "SuperNode ID"
