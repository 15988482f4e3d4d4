"""Runtime and load parameters: coerced to their declared type, clamped to their range.

Bad values never stop a stream: a value of the wrong type keeps the previous value, an out-of-range
one is clamped; each parameter warns once (not once per frame). Unknown keys are ignored: Scope
sends many that belong to other pipelines. Only values that changed since the last call are
processed, since Scope resends the whole parameter dict on every call.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from annotated_types import Ge, Le
from pydantic import TypeAdapter, ValidationError

logger = logging.getLogger("scope_streamdiffusion")

_MISSING = object()
LCM_GRID_STEPS = 50  # engine.schedule.LCM_GRID_STEPS, repeated here to keep this module torch-free
# compel encodes long prompts in 77-token chunks; ~2,000 characters is ~6 chunks already.
MAX_PROMPT_CHARS = 2000
# Scope's UI sends prompt weights of 0-100. Far larger ones only need to dominate a blend; capped,
# an infinite weight (or a sum of huge ones) cannot turn the normalised blend into NaN or zeros.
MAX_PROMPT_WEIGHT = 1e6


def normalize_prompts(value: Any) -> tuple[tuple[str, float], ...] | None:
    """Every prompt form Scope or a caller sends -> ((text, weight), ...); None if unusable.

    Accepts a str, a list of str, or a list of {"text", "weight"} dicts (weights on any scale: the
    blend normalises them).
    """
    if isinstance(value, str):
        return ((value, 1.0),)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        return None
    items = []
    for item in value:
        if isinstance(item, str):
            items.append((item, 1.0))
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            try:
                weight = float(item.get("weight", 1.0))
            except (TypeError, ValueError):
                weight = 1.0
            items.append((item["text"], min(max(weight, 0.0), MAX_PROMPT_WEIGHT) if weight == weight else 1.0))
        else:
            return None
    return tuple(items)


def field_bounds(field) -> tuple[Any, Any]:
    """(ge, le) of a pydantic field; None where it has no bound."""
    ge = le = None
    for meta in field.metadata:
        if isinstance(meta, Ge):
            ge = meta.ge
        elif isinstance(meta, Le):
            le = meta.le
    return ge, le


class ParameterCoercer:
    def __init__(self, config_cls):
        self.fields = config_cls.model_fields
        self._adapters: dict[str, TypeAdapter] = {}
        self._last_raw: dict[str, Any] = {}
        self._warned: set[tuple[str, str]] = set()

    def defaults(self) -> dict[str, Any]:
        return {name: f.default for name, f in self.fields.items()}

    def _warn_once(self, name: str, kind: str, message: str, *args) -> None:
        if (name, kind) not in self._warned:
            self._warned.add((name, kind))
            logger.warning(message, *args)

    def _bounds(self, name: str):
        return field_bounds(self.fields[name])

    def coerce(self, name: str, value: Any, previous: Any) -> Any:
        """The clean value for ``name`` (or ``previous`` if ``value`` is unusable)."""
        field = self.fields[name]
        adapter = self._adapters.get(name)
        if adapter is None:
            adapter = self._adapters[name] = TypeAdapter(field.annotation)
        try:
            clean = adapter.validate_python(value, strict=False)
        except ValidationError:
            self._warn_once(name, "type", "Ignoring %s=%r: expected %s; keeping %r.", name, value,
                            _expected(field.annotation), previous)
            return previous
        if name == "negative_prompt" and isinstance(clean, str) and len(clean) > MAX_PROMPT_CHARS:
            self._warn_once(name, "length", "negative_prompt is longer than %d characters; the rest is ignored.",
                            MAX_PROMPT_CHARS)
            clean = clean[:MAX_PROMPT_CHARS]
        if name == "t_index_list" and clean is not None:
            return self._timestep_indices(clean)
        ge, le = self._bounds(name)
        if isinstance(clean, (int, float)) and not isinstance(clean, bool):
            if clean != clean:  # NaN
                self._warn_once(name, "nan", "Ignoring %s=NaN; keeping %r.", name, previous)
                return previous
            bounded = clean
            if ge is not None and bounded < ge:
                bounded = type(clean)(ge)
            if le is not None and bounded > le:
                bounded = type(clean)(le)
            if bounded != clean:
                self._warn_once(name, "range", "%s=%r is outside [%s, %s]; using %r.", name, clean, ge, le, bounded)
            return bounded
        return clean

    def _timestep_indices(self, indices: list[int]) -> list[int] | None:
        """Indices into the 50-step grid: in range, ascending, unique, at most as many as steps allow."""
        max_steps = int(self._bounds("num_inference_steps")[1])
        clean = sorted({min(max(int(i), 0), LCM_GRID_STEPS - 1) for i in indices})[:max_steps]
        if clean != list(indices):
            self._warn_once("t_index_list", "range", "t_index_list=%r must be ascending indices in [0, %d], at "
                            "most %d; using %r.", indices, LCM_GRID_STEPS - 1, max_steps, clean)
        return clean or None

    def prompts(self, name: str, value: Any) -> tuple[tuple[str, float], ...] | None:
        """A prompt value in any accepted form, with over-long texts cut (one warning)."""
        prompts = normalize_prompts(value)
        if prompts is None:
            self._warn_once(name, "type", "Ignoring %s=%r: expected a string or a list of {text, weight}.",
                            name, value)
            return None
        if any(len(text) > MAX_PROMPT_CHARS for text, _ in prompts):
            self._warn_once(name, "length", "A prompt is longer than %d characters; the rest is ignored.",
                            MAX_PROMPT_CHARS)
            prompts = tuple((text[:MAX_PROMPT_CHARS], w) for text, w in prompts)
        return prompts

    def changes(self, kwargs: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        """Clean values of the known parameters in ``kwargs`` that differ from the last call's."""
        out = {}
        for name, value in kwargs.items():
            if name not in self.fields:
                continue
            if _equal(self._last_raw.get(name, _MISSING), value):
                continue
            self._last_raw[name] = _snapshot(value)
            clean = self.coerce(name, value, current.get(name))
            if clean != current.get(name):
                out[name] = clean
        return out

    def seen(self, name: str, value: Any) -> bool:
        """True if ``value`` is what ``name`` had last time (and remember it)."""
        same = _equal(self._last_raw.get(name, _MISSING), value)
        if not same:  # Scope resends the same prompts every call: copy only on change
            self._last_raw[name] = _snapshot(value)
        return same


def _expected(annotation) -> str:
    """A field's type as a user reads it: the choices of a Literal, X of an Optional[X]."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if len(args) == 1 and typing.get_origin(annotation) is not list:  # Optional[X]
        return _expected(args[0])
    return getattr(annotation, "__name__", str(annotation))


def _snapshot(value: Any) -> Any:
    """A copy of lists/dicts, so a caller editing its list in place and resending it is seen as a change."""
    if isinstance(value, (list, dict)):
        try:
            return copy.deepcopy(value)
        except Exception:  # noqa: BLE001 - odd contents: compare by identity then
            return value
    return value


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - tensors and other odd values: treat as changed
        return False
