"""Launchers: the seam between the coordinator and wherever ranks run."""

from rankwarden.launcher._base import (
    BOOTSTRAP_MODULE,
    AdoptsRanks,
    CpuSample,
    Detaches,
    ExitStatus,
    LaunchRequest,
    Launcher,
    Placement,
    PlacesRanks,
    RankProcess,
    ReleasesJobs,
    ReleasesOrphans,
    ReportsCpu,
    SizesAttempts,
    WarmAware,
)
from rankwarden.launcher._agent import AgentLauncher, AgentRankProcess, NodeInfo
from rankwarden.launcher._local import LocalProcess
from rankwarden.launcher._process import ProcessLauncher
from rankwarden.launcher._warm import WarmProcess

__all__ = [
    "BOOTSTRAP_MODULE",
    "AdoptsRanks",
    "AgentLauncher",
    "AgentRankProcess",
    "CpuSample",
    "Detaches",
    "ExitStatus",
    "LaunchRequest",
    "Launcher",
    "LocalProcess",
    "NodeInfo",
    "Placement",
    "PlacesRanks",
    "ProcessLauncher",
    "RankProcess",
    "ReleasesJobs",
    "ReleasesOrphans",
    "ReportsCpu",
    "SizesAttempts",
    "WarmAware",
    "WarmProcess",
]
