"""Node agents: what runs on each host of a multi-node job.

``Relay`` aggregates the node's ranks' heartbeats onto one coordinator
connection (see ``rankwarden.agent._relay``).
"""

from rankwarden.agent._relay import Relay

__all__ = ["Relay"]
