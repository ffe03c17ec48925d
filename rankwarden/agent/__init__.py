"""Node agents: one per host of a multi-node job, each running its host's ranks for one coordinator.

``run_agent`` is the agent's whole lifetime (``rankwarden run --nnodes N
--node-rank K`` runs it on every node; node 0 also runs the coordinator).
The coordinator's side is ``rankwarden.launcher.AgentLauncher``.
"""

from rankwarden.agent._agent import AgentConfig, AgentResult, rank_coordinator_address, run_agent

__all__ = ["AgentConfig", "AgentResult", "rank_coordinator_address", "run_agent"]
