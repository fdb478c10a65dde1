"""User-facing errors: one line, no traceback, a documented exit code.

Exit codes (also in the README):

====  ==========================================================
0     success
1     a stage ran and failed (doit: task failed)
2     a stage could not be run (doit: task error)
3     bad configuration or bad command-line input
4     a plugin failed to load or broke the plugin contract
5     an external system is unreachable or missing (Docker daemon,
      kube context, store, serving endpoint)
6     a quality gate failed (accuracy floor, drift limit)
====  ==========================================================
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_STAGE_FAILED = 1
EXIT_STAGE_ERROR = 2
EXIT_CONFIG = 3
EXIT_PLUGIN = 4
EXIT_UNAVAILABLE = 5
EXIT_GATE = 6


class MlflowctlError(Exception):
    """An error the user can fix: printed as one line, never as a traceback.

    ``hint`` is the next thing to try (a command or a config change).
    """

    exit_code = EXIT_STAGE_ERROR

    def __init__(self, message: str, hint: str | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(MlflowctlError):
    """Invalid ``mlflowctl.yaml`` or ``key=value`` override."""

    exit_code = EXIT_CONFIG


class PluginError(MlflowctlError):
    """A plugin failed to import or does not fit the hook contract."""

    exit_code = EXIT_PLUGIN


class UnavailableError(MlflowctlError):
    """An external system (Docker, Kubernetes, a store, an endpoint) cannot be reached."""

    exit_code = EXIT_UNAVAILABLE


class StageFailed(MlflowctlError):
    """A stage ran and exited non-zero."""

    exit_code = EXIT_STAGE_FAILED


class GateFailed(MlflowctlError):
    """A quality gate (accuracy floor, drift limit) was not met."""

    exit_code = EXIT_GATE


class Cancelled(StageFailed):
    """A stage run was cancelled (Ctrl-C) or hit its timeout; nothing was published."""
