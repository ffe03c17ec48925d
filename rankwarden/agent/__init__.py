"""Node agents: one per host of a multi-node job, each running its host's ranks for one coordinator.

``run_agent`` is the agent's whole lifetime (``rankwarden run --nnodes N
--node-rank K`` runs it on every node; node 0 also runs the coordinator).
The coordinator's side is ``rankwarden.launcher.AgentLauncher``. ``Relay``
aggregates the node's ranks' heartbeats onto one coordinator connection (see
``rankwarden.agent._relay``).
"""

from rankwarden.agent._agent import AgentConfig, AgentResult, rank_coordinator_address, run_agent
from rankwarden.agent._relay import Relay

__all__ = ["AgentConfig", "AgentResult", "Relay", "rank_coordinator_address", "run_agent"]
