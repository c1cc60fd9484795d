"""The registry's rules: the gate that sets ``challenger``, and moving ``champion`` by hand (promotion, rollback),
each move recorded as tags (who, when, why); what a champion must have (:func:`champion_violations`).

A champion set elsewhere (the MLflow UI) is recorded by :func:`adopt_champion`, called by the registry-event
listener (components/registry/events.py).  Every read-then-move of aliases holds the model's registry lock
(components/registry/lock.py).

Used through :mod:`components.steps.register` and the ``vilbert register`` / ``promote`` / ``rollback`` commands; the
rules are stated in the docstring of :mod:`components.steps.register`.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous-champion"
HISTORY_TAG = "champion.history"
NOT_BETTER, NOT_COMPARABLE = "not_better", "not_comparable"
GATE_RULE = "value > reference + min_delta for the champion and the challenger that exist; ties do not beat"
VIOLATIONS_TAG = "rules.violations"
MAX_HISTORY_CHARS = 90_000  # under MLflow's 100,000-character tag value limit: the oldest events are dropped


class RegistryError(ValueError):
    """A registry operation cannot be done (unknown model, version or alias, bad inputs); the message says why."""


@dataclass(frozen=True)
class AliasChange:
    """One move of ``champion``."""

    name: str
    """Registered model."""
    action: str
    """``promote`` or ``rollback``."""
    champion: str
    """The version that is champion now."""
    replaced: str | None
    """The version that was champion before (None: there was none)."""
    actor: str
    """Who (``--actor``, else ``$USER``)."""
    at: str
    """When: UTC, ISO 8601."""
    reason: str
    """Why (required)."""
    source: str = "vilbert"
    """Where the move was made: ``vilbert`` (promote / rollback) or ``mlflow-ui`` (adopted from a registry event)."""
    violations: tuple[str, ...] = ()
    """Rules the new champion breaks (:func:`champion_violations`): flagged, never reverted."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the gate -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionMetric:
    """What the gate knows about a reference version (from its tags)."""

    version: str
    metric: str | None
    split: str | None
    value: float | None


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict for a new version."""

    decision: str
    """``challenger``, ``not_better`` or ``not_comparable``."""
    reason: str
    """One human sentence."""
    champion: VersionMetric | None = None
    challenger: VersionMetric | None = None
    min_delta: float = 0.0

    def tags(self) -> dict[str, str]:
        tags = {"gate.decision": self.decision, "gate.reason": self.reason, "gate.rule": GATE_RULE,
                "gate.min_delta": repr(self.min_delta)}  # fmt: skip
        for role, ref in (("champion", self.champion), ("challenger", self.challenger)):
            tags[f"gate.{role}_version"] = ref.version if ref else "none"
            tags[f"gate.{role}_value"] = repr(ref.value) if ref and ref.value is not None else "none"
        return tags


def gate(metric: str, split: str | None, value: float, champion: VersionMetric | None,
         challenger: VersionMetric | None, min_delta: float = 0.0) -> GateDecision:  # fmt: skip
    """Decide whether a new version (``metric`` = ``value`` on ``split``) becomes ``challenger`` (module docstring)."""
    if challenger is not None and champion is not None and challenger.version == champion.version:
        challenger = None  # both aliases on one version: one reference
    refs = [(role, ref) for role, ref in ((CHAMPION, champion), (CHALLENGER, challenger)) if ref is not None]
    for role, ref in refs:
        if ref.metric != metric or ref.split != split or ref.value is None:
            reason = (f"the {role} (version {ref.version}) was measured as {ref.metric} on split {ref.split}, this "
                      f"version as {metric} on split {split}: not comparable, no alias set")  # fmt: skip
            return GateDecision(NOT_COMPARABLE, reason, champion, challenger, min_delta)
        if not value > ref.value + min_delta:
            reason = (f"{metric} {value:g} does not beat the {role}'s {ref.value:g} (version {ref.version})"
                      + (f" by more than {min_delta:g}" if min_delta else ""))  # fmt: skip
            return GateDecision(NOT_BETTER, reason, champion, challenger, min_delta)
    if not refs:
        reason = f"first candidate ({metric} {value:g}): no champion or challenger to beat"
    else:
        reason = f"{metric} {value:g} beats " + " and ".join(
            f"the {r}'s {x.value:g} (version {x.version})" for r, x in refs
        )
    return GateDecision(CHALLENGER, reason, champion, challenger, min_delta)


def reference(client: Any, name: str, alias: str) -> VersionMetric | None:
    """The gate's view of the version behind ``alias`` (None when the model or the alias does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return None
    if alias not in aliases:
        return None
    tags = client.get_model_version(name, str(aliases[alias])).tags
    try:
        value: float | None = float(tags["metric.value"])
    except (KeyError, ValueError):
        value = None
    return VersionMetric(str(aliases[alias]), tags.get("metric.name"), tags.get("eval.split"), value)


# --- aliases ----------------------------------------------------------------------------------------------------


def client_for(tracking_uri: str | None) -> tuple[Any, str]:
    """``(MlflowClient, uri)`` for the tracking and registry store ``tracking_uri`` (default: the project's)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from components.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _actor(actor: str | None) -> str:
    if actor and actor.strip():
        return actor.strip()
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def _aliases(client: Any, name: str, uri: str) -> dict[str, str]:
    """The registered model's aliases; a :class:`RegistryError` listing the known models when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    except MlflowException:
        from components.registry.lock import is_lock

        known = sorted(m.name for m in client.search_registered_models(max_results=50) if not is_lock(m.name))
        raise RegistryError(f"no registered model {name!r} in {uri} (registered: {known or 'none'})") from None


def _check_version(client: Any, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException:
        known = sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)
        raise RegistryError(f"model {name!r} has no version {version!r} (versions: {known})") from None


def _record(client: Any, change: AliasChange, tags: dict[str, dict[str, str]]) -> None:
    """Version tags (version -> {key: value}) and one event appended to the model's ``champion.history``."""
    for version, values in tags.items():
        for key, value in values.items():
            client.set_model_version_tag(change.name, version, key, value)
    current = client.get_registered_model(change.name).tags.get(HISTORY_TAG)
    history = json.loads(current) if current else []
    history.append(change.to_dict())
    while len(json.dumps(history)) > MAX_HISTORY_CHARS and len(history) > 1:
        history.pop(0)
    client.set_registered_model_tag(change.name, HISTORY_TAG, json.dumps(history))


def utc_now() -> str:
    """Now, UTC, ISO 8601 to the second (the time of every recorded registry change)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def promote(name: str, reason: str, version: str | None = None, actor: str | None = None,
            tracking_uri: str | None = None) -> AliasChange:  # fmt: skip
    """Make ``version`` (default: the ``challenger``) the ``champion``; the old champion becomes
    ``previous-champion``; ``challenger`` is removed when it pointed at the promoted version."""
    from components.registry.lock import registry_lock

    if not reason or not reason.strip():
        raise RegistryError("a promotion needs a reason (--reason)")
    client, uri = client_for(tracking_uri)
    _aliases(client, name, uri)  # a clear error for an unknown model, before the lock is made
    with registry_lock(client, name):
        aliases = _aliases(client, name, uri)
        if version is None:
            if CHALLENGER not in aliases:
                raise RegistryError(f"model {name!r} has no {CHALLENGER!r} alias (aliases: {aliases or 'none'}): "
                                    "name the version to promote (--version)")  # fmt: skip
            version = aliases[CHALLENGER]
        version = str(version)
        _check_version(client, name, version)
        old = aliases.get(CHAMPION)
        if old == version:
            raise RegistryError(f"version {version} of {name!r} is already the champion")
        client.set_registered_model_alias(name, CHAMPION, version)
        return _after_promotion(client, name, version, old, aliases, _actor(actor), reason.strip(), "vilbert")


def adopt_champion(client: Any, name: str, version: str, old: str | None, actor: str, reason: str,
                   source: str) -> AliasChange:  # fmt: skip
    """Record a ``champion`` that was already moved to ``version`` elsewhere (``old``: who held it before) exactly
    as :func:`promote` records its own: ``previous-champion``, ``challenger`` dropped from ``version``, tags,
    history, and the rules it breaks flagged on the version.  The caller holds the registry lock."""
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    return _after_promotion(client, name, version, old, aliases, actor, reason, source)


def _after_promotion(client: Any, name: str, version: str, old: str | None, aliases: dict[str, str], actor: str,
                     reason: str, source: str) -> AliasChange:  # fmt: skip
    violations = tuple(champion_violations(client, name, version, old))
    change = AliasChange(name, "promote", version, old, actor, utc_now(), reason, source, violations)
    if old is not None and old != version:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, old)
    if aliases.get(CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    tags = {version: {"champion.promoted_by": change.actor, "champion.promoted_at": change.at,
                      "champion.promotion_reason": change.reason, "champion.replaced_version": str(old),
                      "champion.source": source}}  # fmt: skip
    if violations:
        tags[version].update({VIOLATIONS_TAG: json.dumps(list(violations)), "rules.flagged_at": change.at})
    if old is not None and old != version:
        tags[old] = {"champion.demoted_by": change.actor, "champion.demoted_at": change.at,
                     "champion.demotion_reason": change.reason, "champion.replaced_by": version}  # fmt: skip
    _record(client, change, tags)
    return change


def rollback(name: str, reason: str, actor: str | None = None, tracking_uri: str | None = None) -> AliasChange:
    """Move ``champion`` back to ``previous-champion`` (which is then removed) and record it."""
    from components.registry.lock import registry_lock

    if not reason or not reason.strip():
        raise RegistryError("a rollback needs a reason (--reason)")
    client, uri = client_for(tracking_uri)
    _aliases(client, name, uri)
    with registry_lock(client, name):
        aliases = _aliases(client, name, uri)
        if PREVIOUS_CHAMPION not in aliases:
            raise RegistryError(f"model {name!r} has no {PREVIOUS_CHAMPION!r} alias to roll back to "
                                f"(aliases: {aliases or 'none'})")  # fmt: skip
        back, bad = aliases[PREVIOUS_CHAMPION], aliases.get(CHAMPION)
        change = AliasChange(name, "rollback", back, bad, _actor(actor), utc_now(), reason.strip())
        client.set_registered_model_alias(name, CHAMPION, back)
        client.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
        tags = {back: {"champion.restored_by": change.actor, "champion.restored_at": change.at,
                       "champion.restore_reason": change.reason, "champion.replaced_version": str(bad)}}  # fmt: skip
        if bad is not None:
            tags[bad] = {"champion.rolled_back_by": change.actor, "champion.rolled_back_at": change.at,
                         "champion.rollback_reason": change.reason, "champion.replaced_by": back}  # fmt: skip
        _record(client, change, tags)
    return change


# --- what a champion must have ------------------------------------------------------------------------------


def champion_violations(client: Any, name: str, version: str, old: str | None) -> list[str]:
    """The rules version ``version`` breaks as champion of ``name`` (``old``: the champion it replaces):

    * it has an evaluation (``metric.name`` / ``metric.value`` tags, set by ``vilbert register``);
    * the gate let it through (``gate.decision`` = ``challenger``);
    * it is comparable with the champion it replaces (same metric and split) and not worse than it."""
    tags = client.get_model_version(name, version).tags
    found = []
    metric, value = tags.get("metric.name"), _number(tags.get("metric.value"))
    if not metric or value is None:
        found.append(f"version {version} has no evaluation (no metric.name / metric.value tags): it was not "
                     "registered by `vilbert register`")  # fmt: skip
    decision = tags.get("gate.decision")
    if decision is None:
        found.append(f"version {version} never passed the gate (no gate.decision tag)")
    elif decision != CHALLENGER:
        found.append(f"the gate did not make version {version} a challenger ({decision}: {tags.get('gate.reason')})")
    if old is not None and old != version and metric and value is not None:
        before = client.get_model_version(name, old).tags
        old_metric, old_value = before.get("metric.name"), _number(before.get("metric.value"))
        if old_metric is None:
            pass  # the replaced champion had no evaluation: nothing to compare with (it was flagged itself)
        elif (old_metric, before.get("eval.split")) != (metric, tags.get("eval.split")):
            found.append(f"version {version} ({metric} on {tags.get('eval.split')}) is not comparable with the "
                         f"champion it replaces, version {old} ({old_metric} on {before.get('eval.split')})")  # fmt: skip
        elif old_value is not None and value < old_value:
            found.append(f"version {version} ({metric} {value:g}) is worse than the champion it replaces, "
                         f"version {old} ({old_value:g})")  # fmt: skip
    return found


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
