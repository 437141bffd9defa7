"""The error tree. Every message names the input, what was expected, and the fix.

    LoralineError
    ├── SettingsError       a setting is missing or unsafe
    ├── SourceError         an adapter/base source cannot be fetched (bad path, URI, revision)
    ├── InvalidAdapter      the adapter is refused before any weights are merged
    ├── MergeError          peft could not merge, or the merged model is not loadable
    ├── ParityError         merged and unmerged outputs disagree beyond tolerance
    ├── RegistryError       MLflow refused or lost a write
    ├── EngineError         the vLLM engine (runner or OpenAI server) is missing, failed or timed out
    ├── TraceError          a REF cannot be resolved to a release
    └── ImageError          the serving image could not be built, pushed, pulled or did not answer right
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


class TraceError(LoralineError):
    pass


class EngineError(LoralineError):
    pass


class ImageError(LoralineError):
    pass
