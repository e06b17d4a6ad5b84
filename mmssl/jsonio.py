"""Strict JSON for every file the project writes: no ``NaN``/``Infinity`` tokens.

Python's ``json`` writes ``NaN``, ``Infinity`` and ``-Infinity`` for non-finite floats;
they are not JSON (RFC 8259, section 6) and strict readers (``jq``, JavaScript's
``JSON.parse``, pandas with ``engine="ujson"``) reject the file. :func:`dumps`
writes ``null`` in their place and, in a top-level object, lists every replaced
value under the key ``"nonfinite"``: a mapping from the value's JSON Pointer
(RFC 6901, e.g. ``"/test~1recall@20"``) to ``"nan"``, ``"inf"`` or ``"-inf"``,
plus ``"nonfinite_why"`` when the caller gives a reason. :func:`loads` reverses
it exactly, so ``loads(dumps(x)) == x`` for NaN-free values and restores the
non-finite ones.

    from mmssl import jsonio
    path.write_text(jsonio.dumps(result, indent=1, why="test metric undefined: ..."))
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

NONFINITE_KEY = "nonfinite"
WHY_KEY = "nonfinite_why"


def _pointer_part(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def sanitize(obj: Any, path: str = "", found: dict[str, str] | None = None) -> tuple[Any, dict[str, str]]:
    """``(obj with every non-finite float replaced by None, {JSON Pointer: "nan"|"inf"|"-inf"})``.

    numpy scalars and arrays become Python numbers and lists; tuples become lists.
    """
    found = {} if found is None else found
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    elif isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        found[path] = "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
        return None, found
    if isinstance(obj, dict):
        return {k: sanitize(v, f"{path}/{_pointer_part(k)}", found)[0] for k, v in obj.items()}, found
    if isinstance(obj, (list, tuple)):
        return [sanitize(v, f"{path}/{i}", found)[0] for i, v in enumerate(obj)], found
    return obj, found


def dumps(obj: Any, why: str | None = None, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (``json.dumps`` keyword arguments accepted).

    Non-finite floats become ``null``; a top-level dict gains ``"nonfinite"`` (what each
    null was) and, if ``why`` is given and there were any, ``"nonfinite_why"``.
    Raises ``ValueError`` if ``obj`` already uses those keys, ``TypeError`` for
    values JSON cannot hold (unless ``default=`` is given).
    """
    clean, found = sanitize(obj)
    if isinstance(clean, dict) and found:
        if NONFINITE_KEY in clean or WHY_KEY in clean:
            raise ValueError(f"jsonio.dumps: the keys {NONFINITE_KEY!r}/{WHY_KEY!r} are reserved")
        clean = {**clean, NONFINITE_KEY: found}
        if why:
            clean[WHY_KEY] = why
    return json.dumps(clean, allow_nan=False, **kwargs)


def loads(text: str | bytes) -> Any:
    """Parse :func:`dumps` output, restoring the non-finite values listed under ``"nonfinite"``."""
    obj = json.loads(text)
    if not isinstance(obj, dict) or NONFINITE_KEY not in obj:
        return obj
    found = obj.pop(NONFINITE_KEY)
    obj.pop(WHY_KEY, None)
    for pointer, kind in found.items():
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
        target = obj
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = parts[-1]
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[kind]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return obj
