"""Per-module rank and alpha maps.

A map key names modules the way peft's ``rank_pattern`` does (it matches a suffix of the module name on
a ``.`` boundary, first matching key wins) with two additions that make layer ranges readable:

* ``{a-b}`` matches any integer from ``a`` to ``b`` inclusive, ``{a,b,c}`` any of the listed integers (``{a}``: one);
* ``*`` matches any run of characters (dots included).

``"layer.{0-5}.attention.self.query"`` therefore adapts the query projection of layers 0-5, and
``"layer.{6-11}.*"`` every adapted module of layers 6-11.

Unlike peft, which ignores a key that matches nothing (peft#3582), :func:`resolve_module_map` raises a
``ValueError`` naming the key and the closest module names, and the resolved map uses exact module names
so a saved ``adapter_config.json`` states the rank of every module unambiguously.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from numbers import Real

# The key syntax's tokens as ``re.escape`` writes them: ``{a-b}``, ``{a,b,c}`` and ``*``.
_TOKEN = re.compile(r"\\\{(\d+)\\-(\d+)\\\}|\\\{(\d+(?:,\d+)*)\\\}|\\\*")


@lru_cache(maxsize=512)
def key_to_regex(key: str) -> re.Pattern:
    """Compile a map key into a regex matching full module names (suffix match on a ``.`` boundary)."""
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"Rank/alpha map keys must be non-empty strings, got {key!r}.")

    def token(m: re.Match) -> str:
        if m.group(1) is None:  # a list, or "*"
            return "(?:" + "|".join(m.group(3).split(",")) + ")" if m.group(3) else ".*"
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise ValueError(f"Rank/alpha map key {key!r}: range {{{lo}-{hi}}} is empty (use {{{hi}-{lo}}}).")
        return "(?:" + "|".join(str(i) for i in range(lo, hi + 1)) + ")"

    # the key escaped as a literal, then its (escaped) tokens replaced left to right
    return re.compile(r"(?:.*\.)?(?:" + _TOKEN.sub(token, re.escape(key)) + r")")


def key_matches(key: str, module_name: str) -> bool:
    return key_to_regex(key).fullmatch(module_name) is not None


def load_module_map(value: Mapping | str | os.PathLike | None, *, what: str) -> dict[str, float] | None:
    """Normalise a rank/alpha map given as a dict or as the path of a JSON file holding one."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}={path!r}: no such file. Pass a dict or the path of a JSON file.")
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} file {path!r} is not valid JSON: {exc}") from exc
        if isinstance(value, dict) and isinstance(value.get("rank_map"), dict):
            value = value["rank_map"]  # a suggested_rank_map.json written by the analysis tools
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict of module-name pattern -> number, got {type(value).__name__}.")
    for key, number in value.items():
        key_to_regex(key)  # validates the key syntax
        if isinstance(number, bool) or not isinstance(number, Real):
            raise TypeError(f"{what}[{key!r}] must be a number, got {number!r}.")
        if number <= 0:
            raise ValueError(f"{what}[{key!r}] = {number}: values must be > 0.")
        if what == "rank_map" and int(number) != number:
            raise ValueError(f"rank_map[{key!r}] = {number}: ranks must be whole numbers.")
    return {str(key): int(number) if what == "rank_map" else number for key, number in value.items()}


def closest_names(query: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The module names that look most like ``query`` (compared on the trailing components too)."""
    names = list(names)
    tails = {".".join(name.split(".")[-(query.count(".") + 1):]): name for name in names}  # as deep as the query
    plain = re.sub(r"\{[^}]*\}", "0", query).replace("*", "")
    return [tails[h] for h in difflib.get_close_matches(plain, list(tails), n=n, cutoff=0.4)] or names[:n]


def resolve_module_map(module_map: Mapping[str, float] | None, targeted: list[str], *,
                       all_modules: Iterable[str] = (), what: str = "rank_map") -> dict[str, float]:
    """Resolve ``module_map`` against the adapted module names into ``{exact module name: value}``.

    Raises ``ValueError`` for a key that matches no adapted module, or only modules an earlier key already
    claimed (first match wins, so such a key would silently do nothing).
    """
    if not module_map:
        return {}
    # adapted module -> the first key that matches it, the one that sets it (a matching key is a non-empty string)
    claimed_by = {name: key for name in targeted
                  if (key := next((k for k in module_map if key_matches(k, name)), ""))}
    for key in (k for k in module_map if k not in claimed_by.values()):  # a key that sets no module: an error
        shadowed = [n for n in targeted if key_matches(key, n)]
        if shadowed:
            raise ValueError(f"{what} key {key!r} only matches modules that earlier keys "
                             f"{sorted({claimed_by[n] for n in shadowed})} already set (first match wins), so it "
                             f"has no effect. Reorder the keys or remove {key!r}.")
        untargeted = [n for n in all_modules if key_matches(key, n)]
        if untargeted:
            raise ValueError(f"{what} key {key!r} matches {untargeted[:3]}, which "
                             f"{'is' if len(untargeted) == 1 else 'are'} not adapted. Add them to target_modules "
                             "or fix the key.")
        raise ValueError(f"{what} key {key!r} matches no adapted module. Closest adapted modules: "
                         f"{closest_names(key, targeted)}. Keys match a suffix of the module name; "
                         "use {a-b} for layer ranges and * as a wildcard.")
    return {name: module_map[key] for name, key in claimed_by.items()}
