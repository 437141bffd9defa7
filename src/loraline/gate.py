"""The release gate: the only code that moves the registry aliases ``candidate`` and ``champion``.

The gate reads what a release recorded (its lineage and the model version's status), checks it
against :class:`~loraline.params.GateThresholds` — and against the current ``champion``: champion–challenger, the
release's task accuracy may be at most ``champion_tolerance`` below the champion's (read from the champion version's
``loraline.eval.accuracy`` tag, else its ``lineage.json``) — and then either

- passes: ``candidate`` moves to the version, and (``promote``) ``champion`` too; the version and
  its run are tagged ``loraline.gate=passed`` (and ``loraline.gate.previous_champion``), or
- fails: the version and run are tagged ``loraline.gate=failed`` with the reasons; no alias moves.

:func:`undo_gate` takes a passing gate back (the release flow's rollback hook, when a step after the gate
fails): each alias it moved returns to the version it named before, unless another release moved it since.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loraline.errors import GateError
from loraline.params import GateThresholds
from loraline.errors import TrackingError
from loraline.tracking import TAG, Tracking, connect
from loraline.settings import Settings

CANDIDATE, CHAMPION = "candidate", "champion"


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ChampionScore:
    """The current ``champion`` version as the champion–challenger check sees it: its task accuracy (None when it
    was never evaluated)."""

    version: str
    accuracy: float | None


@dataclass(frozen=True)
class GateDecision:
    model_name: str
    model_version: str
    passed: bool
    checks: tuple[GateCheck, ...]
    aliases_moved: dict[str, str] = field(default_factory=dict)  # alias -> version it now names
    previous_champion: str | None = None
    previous_candidate: str | None = None
    champion: ChampionScore | None = None  # what the champion-challenger check compared against

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": self.reasons}


def best_server_tok_s(lineage: dict[str, Any], path: str = "vllm-server-merged") -> float | None:
    """The best output tokens/s of ``path`` over its concurrency levels, from the lineage's benchmark summary."""
    values = [v for k, v in ((lineage.get("benchmark") or {}).get("output_tok_s") or {}).items() if k.split("@")[0] == path]
    return max(values) if values else None


def champion_check(lineage: dict[str, Any], champion: ChampionScore | None, tolerance: float) -> GateCheck:
    """Champion–challenger: the release's task accuracy must be at least the champion's minus ``tolerance``."""
    version = str(lineage["model_version"])
    ev = lineage.get("evaluation") or {}
    if champion is None:
        return GateCheck("champion", True, "champion: none yet; this release is compared with no one")
    if champion.version == version:
        return GateCheck("champion", True, f"champion: this version (v{version}) is the champion already")
    if champion.accuracy is None:
        return GateCheck("champion", True, f"champion v{champion.version} has no task evaluation: nothing to compare with")
    if ev.get("accuracy") is None:
        return GateCheck("champion", False, f"task evaluation: not run (LORALINE_EVAL=false); champion v{champion.version} "
                                            f"scored {champion.accuracy:.1%} and the comparison needs this release's accuracy")
    acc = float(ev["accuracy"])
    # Accuracies are recorded rounded to 4 places: compare at that precision, not at float noise.
    ok = round(acc - (champion.accuracy - tolerance), 4) >= 0
    where = "is not below" if ok else "is below"
    return GateCheck("champion", ok, f"task accuracy {acc:.1%} (v{version}) {where} champion v{champion.version}'s "
                                     f"{champion.accuracy:.1%} (tolerance {tolerance:.1%})")


def decide(lineage: dict[str, Any], status: str, t: GateThresholds, champion: ChampionScore | None = None) -> GateDecision:
    """Check a release against the thresholds (no side effects). ``champion``: the current ``champion`` version and
    its task accuracy (None: there is none), for the champion–challenger check (``t.champion_tolerance``)."""
    checks: list[GateCheck] = []
    checks.append(GateCheck("status", status != "failed",
                            f"status is {status!r}" + (" (a step after registration failed)" if status == "failed" else "")))
    p = lineage.get("parity") or {}
    prompts = int(p.get("prompts") or 0)
    share = (int(p.get("identical") or 0) / prompts) if prompts else 0.0
    checks.append(GateCheck("parity", prompts > 0 and int(p.get("failed") or 0) == 0 and share >= t.min_parity_identical,
                            f"HF parity: {p.get('identical')} of {prompts} identical ({share:.0%}), {p.get('failed')} failed; "
                            f"needs >= {t.min_parity_identical:.0%} identical and none failed"))
    ev = lineage.get("evaluation")
    if t.min_accuracy > 0 or t.min_accuracy_gain is not None:
        if not ev:
            checks.append(GateCheck("evaluation", False, "task evaluation: not run (LORALINE_EVAL=false); the gate requires it"))
        else:
            acc, gain = float(ev["accuracy"]), float(ev["gain"])
            checks.append(GateCheck("accuracy", acc >= t.min_accuracy,
                                    f"task accuracy {acc:.1%} ({ev['examples']} questions, base {float(ev['base_accuracy']):.1%}); "
                                    f"needs >= {t.min_accuracy:.1%}"))
            if t.min_accuracy_gain is not None:
                checks.append(GateCheck("accuracy_gain", gain >= t.min_accuracy_gain,
                                        f"accuracy gain over the base {gain:+.1%}; needs >= {t.min_accuracy_gain:+.1%}"))
    vp = lineage.get("vllm_parity") or {}
    if t.require_vllm_parity:
        ok = bool(vp) and all(int(v.get("failed") or 0) == 0 for v in vp.values())
        checks.append(GateCheck("vllm_parity", ok, "vLLM parity: " + (
            ", ".join(f"{k} {v.get('identical')} identical / {v.get('close')} close / {v.get('failed')} failed" for k, v in vp.items())
            if vp else "not run (LORALINE_VLLM_PARITY=false); the gate requires it")))
    bench = lineage.get("benchmark")
    if t.require_benchmark or t.min_output_tok_s is not None:
        checks.append(GateCheck("benchmark", bool(bench), "benchmark: " + ("recorded" if bench else "not run; the gate requires it")))
    if t.min_output_tok_s is not None and bench:
        best = best_server_tok_s(lineage)
        checks.append(GateCheck("throughput", best is not None and best >= t.min_output_tok_s,
                                f"vLLM server (merged) best output: {best if best is not None else 'not measured'} tok/s; "
                                f"needs >= {t.min_output_tok_s:g}"))
    if t.require_image:
        smoked = [i for i in lineage.get("images") or [] if (i.get("smoke") or {}).get("ready_seconds") is not None]
        checks.append(GateCheck("image", bool(smoked), "serving image: " + (
            ", ".join(f"{i['mode']} {i['pinned']} smoke-tested" for i in smoked) if smoked
            else "none pushed and smoke-tested; the gate requires one")))
    if lineage.get("gguf"):
        checks.append(gguf_check(lineage["gguf"], t.max_gguf_quant_failed, t.max_gguf_accuracy_drop))
    if t.champion_tolerance is not None:
        checks.append(champion_check(lineage, champion, t.champion_tolerance))
    return GateDecision(model_name=str(lineage["model_name"]), model_version=str(lineage["model_version"]),
                        passed=all(c.passed for c in checks), checks=tuple(checks), champion=champion)


def gguf_check(files: list[dict[str, Any]], max_failed: float | None, max_accuracy_drop: float | None = None) -> GateCheck:
    """The GGUF exports against the merged model, each file reported: its parity verdict — a quantized file may fail at
    most ``max_failed`` of the prompts (None: no limit), an f16 file none — and its task accuracy beside the merged
    model's, which it may be at most ``max_accuracy_drop`` below (absolute; None: no limit; f16 too). A file without
    an accuracy (the release ran no task evaluation) is reported as such and passes that part."""
    parts, ok = [], True
    for f in files:
        p = f.get("parity") or {}
        prompts, failed = int(p.get("prompts") or 0), int(p.get("failed") or 0)
        share = failed / prompts if prompts else 1.0
        limit = 0.0 if f["quant"] == "f16" else max_failed
        ok = ok and (limit is None or share <= limit)
        part = (f"{f['quant']} {p.get('verdict')} ({p.get('identical')} identical, {p.get('close')} close, {failed} failed "
                f"of {prompts})")
        a = f.get("accuracy") or {}
        if a.get("accuracy") is None or a.get("merged_accuracy") is None:
            part += ", task accuracy not measured"
        else:
            acc, merged = float(a["accuracy"]), float(a["merged_accuracy"])
            # Accuracies are recorded rounded to 4 places: compare at that precision, not at float noise.
            within = max_accuracy_drop is None or round(merged - acc - max_accuracy_drop, 4) <= 0
            ok = ok and within
            part += (f", task accuracy {acc:.1%} vs merged {merged:.1%} ({100 * (acc - merged):+.1f} points, "
                     f"{a.get('examples')} questions){'' if within else ' — too low'}")
        parts.append(part)
    need = "f16 none failed" + ("" if max_failed is None else f", quantized <= {max_failed:.0%} failed")
    if max_accuracy_drop is not None:
        need += f", task accuracy at most {100 * max_accuracy_drop:.1f} points below the merged model's"
    return GateCheck("gguf", ok, f"GGUF files vs the merged model: {'; '.join(parts)}; needs {need}")


def champion_score(t: Tracking, name: str, version: str) -> ChampionScore:
    """The task accuracy of ``models:/name/version``: its ``loraline.eval.accuracy`` tag, else its ``lineage.json``."""
    mv = t.client.get_model_version(name, version)
    tag = (mv.tags or {}).get(f"{TAG}eval.accuracy")
    if tag not in (None, "", "None"):
        return ChampionScore(str(version), float(tag))
    ev = t.lineage(mv.run_id).get("evaluation") or {}
    return ChampionScore(str(version), float(ev["accuracy"]) if ev.get("accuracy") is not None else None)


def gate_release(lineage: dict[str, Any], thresholds: GateThresholds, settings: Settings) -> GateDecision:
    """Decide on the release ``lineage`` describes and apply the decision in the MLflow registry."""
    t = connect(settings)
    client = t.client
    name, version = str(lineage["model_name"]), str(lineage["model_version"])
    try:
        mv = client.get_model_version(name, version)
    except TrackingError as e:
        raise GateError(f"cannot gate models:/{name}/{version}: {e}") from e
    if mv.run_id != lineage.get("mlflow_run_id"):
        raise GateError(f"models:/{name}/{version} belongs to run {mv.run_id}, not {lineage.get('mlflow_run_id')}: "
                        "the lineage given to the gate is not this version's")
    aliases = {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}
    previous = aliases.get(CHAMPION)
    try:
        champion = champion_score(t, name, previous) if previous and thresholds.champion_tolerance is not None else None
    except TrackingError as e:
        raise GateError(f"cannot read the evaluation of the champion models:/{name}/{previous}: {e}") from e
    decision = decide(lineage, (mv.tags or {}).get(f"{TAG}status", "unknown"), thresholds, champion)
    moved: dict[str, str] = {}
    if decision.passed:
        client.set_registered_model_alias(name, CANDIDATE, version)
        moved[CANDIDATE] = version
        if thresholds.promote:
            client.set_registered_model_alias(name, CHAMPION, version)
            moved[CHAMPION] = version
    tags = {"gate": "passed" if decision.passed else "failed",
            "gate.reasons": "; ".join(decision.reasons)[:4000] or "none",
            "gate.thresholds": thresholds.model_dump_json()}
    if moved.get(CHAMPION) and previous and previous != version:
        tags["gate.previous_champion"] = previous
    for k, v in tags.items():
        client.set_model_version_tag(name, version, TAG + k, v)
        client.set_tag(mv.run_id, TAG + k, v)
    return GateDecision(**{**asdict(decision), "checks": decision.checks, "champion": decision.champion, "aliases_moved": moved,
                           "previous_champion": previous, "previous_candidate": aliases.get(CANDIDATE)})


def undo_gate(decision: dict[str, Any], reason: str, settings: Settings) -> dict[str, str]:
    """Take back what a passing :func:`gate_release` moved (``decision`` is its ``to_dict()``): every alias it moved
    to the version goes back to the version it named before, or is removed if it named none; an alias another release
    has moved since is left alone. The version and its run are tagged ``loraline.gate=rolled-back`` with ``reason``.
    Returns alias -> where it points now ('' = unset) for the aliases put back."""
    client = connect(settings).client
    name, version = str(decision["model_name"]), str(decision["model_version"])
    now = {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}
    before = {CANDIDATE: decision.get("previous_candidate") or "", CHAMPION: decision.get("previous_champion") or ""}
    restored: dict[str, str] = {}
    for alias, moved_to in (decision.get("aliases_moved") or {}).items():
        if now.get(alias) != str(moved_to):
            continue  # moved by another release since: theirs
        if before[alias]:
            client.set_registered_model_alias(name, alias, before[alias])
        else:
            client.delete_registered_model_alias(name, alias)
        restored[alias] = before[alias]
    mv = client.get_model_version(name, version)
    for k, v in {"gate": "rolled-back", "gate.rollback": reason[:4000]}.items():
        client.set_model_version_tag(name, version, TAG + k, v)
        client.set_tag(mv.run_id, TAG + k, v)
    return restored
