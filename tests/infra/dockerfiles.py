"""A small Dockerfile and .dockerignore reader for the offline checks of infra/docker (no Docker engine here).

Covers what our files use: line continuations, comments, global and per-stage ARG defaults, named stages,
`FROM <stage>` inheritance, and the exec (JSON) form of ENTRYPOINT. Not a general Dockerfile parser.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    """One build stage: its base (an image or an earlier stage) and its instructions."""

    name: str | None
    base: str
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        """Arguments of every instruction with this keyword, in order."""
        return [value for key, value in self.instructions if key == keyword]


@dataclass
class Dockerfile:
    """A parsed Dockerfile: global ARG defaults and the stages in order."""

    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        """The stage named ``name``."""
        return next(s for s in self.stages if s.name == name)

    def parent(self, stage: Stage) -> Stage | None:
        """The earlier stage ``stage`` is built FROM, or None when it starts from an image."""
        return next((s for s in self.stages if s.name == stage.base), None)

    def lineage(self, stage: Stage) -> list[Stage]:
        """``stage`` and the stages it inherits from, nearest first."""
        chain = [stage]
        while (parent := self.parent(chain[-1])) is not None:
            chain.append(parent)
        return chain

    def effective(self, stage: Stage, keyword: str) -> str | None:
        """The last value of ``keyword`` (USER, ENTRYPOINT, ...) in force in ``stage``, inheritance included."""
        for s in self.lineage(stage):
            if s.values(keyword):
                return s.values(keyword)[-1]
        return None

    def expand(self, stage: Stage, text: str) -> str:
        """Substitute ``${NAME}`` / ``$NAME`` with the ARG defaults visible in ``stage``."""
        scope = dict(self.global_args)
        for s in reversed(self.lineage(stage)):
            scope.update(s.args)
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m.group(1) or m.group(2), m.group(0)), text)


def logical_lines(text: str) -> list[str]:
    """Instructions with their continuation lines joined and comment lines dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].strip() + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def parse(path: Path) -> Dockerfile:
    """Parse the Dockerfile at ``path``."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, value = line.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", value, re.IGNORECASE)
            assert match, f"{path}: cannot read FROM {value}"
            stages.append(Stage(name=match.group(2), base=match.group(1)))
            continue
        if keyword == "ARG":
            name, _, default = value.partition("=")
            (stages[-1].args if stages else global_args)[name] = default
            continue
        assert stages, f"{path}: {keyword} before the first FROM"
        stages[-1].instructions.append((keyword, value))
    return Dockerfile(global_args, stages)


def exec_form(value: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD as a list."""
    parsed = json.loads(value)
    assert isinstance(parsed, list), value
    return parsed


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """The rules of the .dockerignore file at ``path`` (see :func:`dockerignore_rules_from_text`)."""
    return dockerignore_rules_from_text(path.read_text())


def dockerignore_rules_from_text(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per line of a .dockerignore, in order (the last matching rule wins).

    Docker's semantics: patterns are relative to the context root (a leading "/" is dropped), "*" does not
    cross "/", "**" matches any number of directories; unlike .gitignore, "data" means only the top-level data.
    """
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line[1:] if exception else line
        pattern = pattern.strip().lstrip("/").rstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((exception, re.compile(regex)))
    return rules


def is_ignored(rules: list[tuple[bool, re.Pattern[str]]], relpath: str) -> bool:
    """Whether ``relpath`` (relative to the context root) is left out of the build context.

    A path is out when the last rule matching it or one of its parent directories is not an exception.
    """
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for exception, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not exception
    return ignored
