"""The registered model's pyfunc: the merged weights served by vLLM.

Logged with MLflow's models-from-code (this file is the model; nothing is pickled). Loading it
needs an environment with ``vllm`` (the serving image, or ``LORALINE_VLLM_PYTHON``'s).
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class VllmServable(PythonModel):
    """Greedy text generation with vLLM over the merged model in the ``weights`` artifact."""

    def load_context(self, context: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as e:  # the orchestrator environment has no vLLM, by design
            raise RuntimeError("this model is served by vLLM: load it in an environment with vllm installed") from e
        self.llm = LLM(model=context.artifacts["weights"])

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        from vllm import SamplingParams

        p = params or {}
        sampling = SamplingParams(temperature=0.0, max_tokens=int(p.get("max_tokens", 128)))
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        return [o.outputs[0].text for o in self.llm.generate(prompts, sampling)]


mlflow.models.set_model(VllmServable())
