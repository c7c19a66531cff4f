"""Exit codes and the exceptions that map to them (docs/faults.md).

0  success or "already done"
2  bad config or input: retrying will not help
75 transient (EX_TEMPFAIL): worth retrying
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75


class JobError(Exception):
    """Base class: a failure with a message a person can act on."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(JobError):
    """The config file or an override is wrong (unknown key, wrong type, unsafe YAML)."""


class InputError(JobError):
    """The data or arguments are wrong: retrying the same job will fail the same way."""


class TransientError(JobError):
    """Something outside us failed in a way that may pass (network, DB restart, SIGTERM)."""

    exit_code = EXIT_TRANSIENT


class Terminated(TransientError):
    """SIGTERM/SIGINT arrived: work was rolled back, temp files removed; a re-run is safe."""
