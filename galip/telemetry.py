"""The telemetry-off environment (galip/telemetry.env, the one list the Makefile and the shell scripts read too)."""

from __future__ import annotations

from pathlib import Path

ENV_FILE = Path(__file__).with_name("telemetry.env")


def telemetry_off() -> dict[str, str]:
    """The variables of galip/telemetry.env, for the environment of processes we start."""
    pairs = (line.split("=", 1) for line in ENV_FILE.read_text().splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


TELEMETRY_OFF = telemetry_off()
