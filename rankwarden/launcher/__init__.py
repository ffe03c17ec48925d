"""Launchers: the seam between the coordinator and wherever ranks run."""

from rankwarden.launcher._base import ExitStatus, LaunchRequest, Launcher, Placement, RankProcess
from rankwarden.launcher._process import LocalProcess, ProcessLauncher

__all__ = ["ExitStatus", "LaunchRequest", "Launcher", "LocalProcess", "Placement", "ProcessLauncher", "RankProcess"]
