"""The error tree. Every message names the input, what was expected, and the fix.

    LoralineError
    ├── SettingsError       a setting or argument (LORALINE_*, --name) is missing, invalid or unsafe
    ├── SourceError         an adapter/base source cannot be fetched (bad path, URI, revision)
    ├── InvalidAdapter      the adapter is refused before any weights are merged
    ├── MergeError          peft could not merge, or the merged model is not loadable
    ├── ParityError         merged and unmerged outputs disagree beyond tolerance
    ├── RegistryError       a release cannot be registered (another process is registering it, or was interrupted)
    │   └── TrackingError   an MLflow call failed: the server does not answer, refuses the credentials, or says no
    ├── EngineError         the vLLM engine (runner or OpenAI server) is missing, failed or timed out
    ├── TraceError          a REF cannot be resolved to a release
    ├── ImageError          the serving image could not be built, pushed, pulled or did not answer right
    ├── GateError           the gate cannot decide on a release (its version or the champion cannot be read)
    ├── WatchError          the watched experiment or folder cannot be read
    ├── PlanError           a model's KV cache cannot be planned (not a model directory, an unplanned layout or device)
    └── ServiceError        a local service (Docker engine, registry, MLflow, Prefect) cannot be started or reached
"""

from __future__ import annotations


class LoralineError(Exception):
    """Root of every error loraline raises on purpose."""


class SettingsError(LoralineError):
    pass


class SourceError(LoralineError):
    pass


class InvalidAdapter(LoralineError):
    pass


class MergeError(LoralineError):
    pass


class ParityError(LoralineError):
    pass


class RegistryError(LoralineError):
    pass


class TrackingError(RegistryError):
    """``error_code``: MLflow's (e.g. ``RESOURCE_DOES_NOT_EXIST``), or ``TEMPORARILY_UNAVAILABLE`` (no answer),
    ``UNAUTHENTICATED`` (401), ``PERMISSION_DENIED`` (403); '' for loraline's own refusals."""

    def __init__(self, message: str, error_code: str = "") -> None:
        super().__init__(message)
        self.error_code = error_code


class TraceError(LoralineError):
    pass


class EngineError(LoralineError):
    pass


class ImageError(LoralineError):
    pass


class GateError(LoralineError):
    pass


class WatchError(LoralineError):
    pass


class PlanError(LoralineError):
    pass


class ServiceError(LoralineError):
    pass
