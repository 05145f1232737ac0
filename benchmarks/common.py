"""Helpers shared by the benchmarks: machine description, server metrics, medians."""

import os
import platform
import re

import httpx


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def tokens_evaluated(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    return float(re.search(r"^grace_server_tokens_evaluated_total (\S+)$", text, re.M).group(1))


def load_note(start: tuple[float, float, float]) -> str:
    """The machine's load around a run (other processes share its cores): 1-minute load average before and after."""
    end = os.getloadavg()
    return f"1-min load average {start[0]:.1f} before, {end[0]:.1f} after, on {os.cpu_count()} cores"
