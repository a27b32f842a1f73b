"""Lines of Flower's own output that fedgpu reads, where Flower offers no public way to ask (flwr 1.42).

Each is matched as text, so each lives here, beside the rest of what a new
Flower release may change. Whether a run was submitted, and how it ended, is
asked of the SuperLink's Control API instead (``control.Control``).
"""

# What Flower's SuperNode logs once its SuperLink accepted it. The launcher waits for it per node, to start
# the next wave and to name a node that never registered; the public listing (`flwr supernode list`, the
# Control API) names nodes by the IDs the SuperLink gave them, which no partition can be matched to.
SUPERNODE_REGISTERED_MARK = "SuperNode ID"
