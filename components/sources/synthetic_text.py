"""Words for the synthetic world: describing objects, judging relations, and what a phrase refers to.

Relations between two objects are judged on the centres of their visible boxes (what a viewer sees):
"A left of B" holds *strictly* when A's centre is left of B's by a clear margin and more than it is above
or below it, and *loosely* when it is left at all.  Generated statements use strict relations only, and a
phrase counts as unambiguous only if no other object satisfies it even loosely.  "In front of" / "behind"
come from the ground-truth occlusion (``occluded_by``), which placement keeps crisp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product

from components.sources.synthetic_world import Scene, SceneObject

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below", "front", "behind")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "front": "behind", "behind": "front"}
#: Surface forms of each relation ("A <phrase> B").  None of them names a place in the picture itself.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "front": ("in front of", "partly covering"),
    "behind": ("behind", "partly hidden behind"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "stripes": ("striped",),
    "gradient": ("smooth", "plain"),
    "noise": ("blotchy", "textured"),
    "checker": ("checkered",),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")
#: A strict "left of" / "above" needs the centres this far apart, as a fraction of the image side.
DIRECTION_MARGIN = 0.08


def plural(noun: str) -> str:
    """English plural of a shape noun (``cross`` -> ``crosses``)."""
    return noun + "es" if noun.endswith(("s", "x", "sh", "ch")) else noun + "s"


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens, punctuation dropped (as the Karpathy and refer toolkits store them)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def with_article(phrase: str, definite: bool = False) -> str:
    """``the x``, ``a x`` or ``an x``."""
    if definite:
        return f"the {phrase}"
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def sentence(text: str) -> str:
    """Capitalised, with a full stop: how a person would type a caption."""
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


@dataclass(frozen=True)
class Desc:
    """A noun phrase for objects: any of shape, colour, size (None = not said)."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        """Whether ``obj`` fits every attribute the phrase states."""
        return (
            (self.shape is None or obj.shape == self.shape)
            and (self.colour is None or obj.colour == self.colour)
            and (self.size is None or obj.size == self.size)
        )

    @property
    def specificity(self) -> int:
        return sum(v is not None for v in (self.shape, self.colour, self.size))

    def words(self, generic: str = "shape", many: bool = False) -> str:
        """``large red circle``; ``generic`` is the noun when no shape is stated; ``many`` pluralises."""
        noun = self.shape or generic
        return " ".join(w for w in (self.size, self.colour, plural(noun) if many else noun) if w)


def full_desc(obj: SceneObject) -> Desc:
    """Every attribute of an object."""
    return Desc(obj.shape, obj.colour, obj.size)


def matching(scene: Scene, desc: Desc) -> list[int]:
    """Positions of the objects a phrase fits."""
    return [k for k, o in enumerate(scene.objects) if desc.matches(o)]


def relation_holds(scene: Scene, a: int, b: int, relation: str, strict: bool) -> bool:
    """Whether object ``a`` is <relation> object ``b`` (see the module docstring for strict vs loose)."""
    first, second = scene.objects[a], scene.objects[b]
    if relation == "front":
        return a in second.occluded_by
    if relation == "behind":
        return b in first.occluded_by
    (ax, ay), (bx, by) = first.centre, second.centre
    along, across = {
        "left": (bx - ax, by - ay),
        "right": (ax - bx, by - ay),
        "above": (by - ay, bx - ax),
        "below": (ay - by, bx - ax),
    }[relation]
    if not strict:
        return along > 0
    return along >= DIRECTION_MARGIN * scene.size and along >= abs(across)


def all_descs(obj: SceneObject) -> list[Desc]:
    """Every non-empty phrase that fits ``obj``, fewest attributes first (shape-naming ones first on ties)."""
    return descs_of(obj.shape, obj.colour, obj.size)


def descs_of(shape: str, colour: str, size: str) -> list[Desc]:
    """Every non-empty phrase that fits an object of this shape, colour and size, in :func:`all_descs`' order (the
    same position is the same form: which attributes the phrase states)."""
    return [Desc(shape if s else None, colour if c else None, size if z else None) for s, c, z in _DESC_ORDER]


# Which attributes a phrase states (shape, colour, size), fewest first; the same order for every object.
_DESC_ORDER = sorted(
    ((s, c, z) for s, c, z in product((True, False), repeat=3) if s or c or z),
    key=lambda m: (sum(m), not m[0]),
)


@dataclass(frozen=True)
class Expression:
    """A referring expression: ``target`` [``relation`` ``landmark``]."""

    target: Desc
    relation: str | None = None
    landmark: Desc | None = None


class SceneFacts:
    """What can be truly said about one scene: its relations (strict and loose) and each object's unique
    phrases, computed once because every question, caption and expression consults them."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        n = len(scene.objects)
        self.loose = {r: [[a != b and relation_holds(scene, a, b, r, False) for b in range(n)] for a in range(n)]
                      for r in RELATIONS}  # fmt: skip
        self.strict = {r: [[a != b and relation_holds(scene, a, b, r, True) for b in range(n)] for a in range(n)]
                       for r in RELATIONS}  # fmt: skip
        self._unique = [[d for d in all_descs(o) if matching(scene, d) == [k]] for k, o in enumerate(scene.objects)]
        self.strict_pairs = [(x, y, r) for r in RELATIONS for x in range(n) for y in range(n) if self.strict[r][x][y]]
        """Every (a, b, relation) that clearly holds."""

    def strict_relations(self, a: int, b: int) -> list[str]:
        """Every relation that clearly holds from ``a`` to ``b``."""
        return [r for r in RELATIONS if self.strict[r][a][b]]

    def resolve(self, desc: Desc, relation: str | None = None, landmark: Desc | None = None) -> list[int]:
        """What ``desc [relation landmark]`` can refer to: objects fitting ``desc`` that stand (loosely) in
        ``relation`` to some other object fitting ``landmark``."""
        found = matching(self.scene, desc)
        if relation is None or landmark is None:
            return found
        marks = matching(self.scene, landmark)
        return [k for k in found if any(self.loose[relation][k][m] for m in marks)]

    def unique_descs(self, k: int) -> list[Desc]:
        """Phrases (no relation) that pick out object ``k`` alone, fewest attributes first."""
        return self._unique[k]

    def shortest_unique(self, k: int, need_shape: bool = True) -> Desc | None:
        """The shortest unique phrase for object ``k`` (one that names the shape, if ``need_shape``)."""
        return next((d for d in self._unique[k] if d.shape is not None or not need_shape), None)

    def referring_expressions(self, k: int) -> list[Expression]:
        """Unambiguous expressions for object ``k``: unique phrases, then relations to uniquely named
        landmarks (holding strictly for ``k``, and not even loosely for any other object fitting the phrase)."""
        found = [Expression(d) for d in self._unique[k]]
        for m in range(len(self.scene.objects)):
            mark = self.shortest_unique(m) if m != k else None
            if mark is None:
                continue
            for relation in self.strict_relations(k, m):
                for desc in all_descs(self.scene.objects[k])[:4]:  # the short phrases: relations do the work
                    if self.resolve(desc, relation, mark) == [k]:
                        found.append(Expression(desc, relation, mark))
                        break
        return found
