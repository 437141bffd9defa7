"""What a release still has to do, given what MLflow already holds of it (a re-run continues, it never starts over).

A release of the same adapter digest onto the same base digest under the same name is found in MLflow
(:func:`loraline.registry.find_release`); its ``lineage.json`` says which of evaluation, benchmark, image and gate are
done. :func:`resume_plan` turns that into the steps left, so the flow only wires them (and this is testable without
Prefect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraline.settings import Settings


@dataclass(frozen=True)
class ResumePlan:
    """The steps a release runs. ``register``: nothing is in MLflow yet (merge, parity and registration run first);
    ``gate``: the gate and the report run (False only when the release is :attr:`done`)."""

    register: bool
    evaluate: bool
    benchmark: bool
    image: bool
    gate: bool

    @property
    def done(self) -> bool:
        """Released and gated before, nothing asked for is missing: a re-run changes nothing (no alias moves back)."""
        return not self.gate


def resume_plan(existing: dict[str, Any] | None, settings: Settings, mode: str) -> ResumePlan:
    """The steps left for a release whose earlier lineage is ``existing`` (None: never registered), with
    ``settings.eval``/``settings.bench`` asking for evaluation and benchmark, and image ``mode`` (``none``: no image)."""
    if existing is None:
        return ResumePlan(register=True, evaluate=settings.eval, benchmark=settings.bench, image=mode != "none", gate=True)
    evaluate = settings.eval and not existing.get("evaluation")
    benchmark = settings.bench and not existing.get("benchmark")
    image = mode != "none" and not any(i.get("mode") == mode for i in existing.get("images", []))
    report_failed = existing.get("failed_step") == "report"
    return ResumePlan(register=False, evaluate=evaluate, benchmark=benchmark, image=image,
                      gate=evaluate or benchmark or image or report_failed or "gate" not in existing)
