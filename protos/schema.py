"""Typed, declarative CR fields, and everything derived from them: parser, CRD schema, defaults.

The HolySheepConfig models (protos/spec.py) are frozen dataclasses made with ``@model``. Each
CR field is one line, ``name: PythonType = field(Node(...), default=..., description=...)``:

- the Python name, whose camelCase is the name on the wire (``max_retries`` -> ``maxRetries``);
- the Python type (the annotation; mypy checks it against the node);
- the wire type with its bounds, pattern or enum: ``Str``, ``Enum``, ``Int``, ``Num``, ``Bool``,
  ``Dur``, ``Obj(Model)``, ``Arr(node)``, ``Map(node)``;
- the default: ``default=`` is the wire default, written as in YAML (``"30s"``); the API server
  applies it too, so it goes into the CRD. ``default_factory=`` is a Python-only value for an
  absent field the API server leaves absent. Neither: the field is required;
- the description (the CRD's, for ``kubectl explain``).

From that one declaration come the strict parser (``read_model``: unknown fields, types, ranges,
enums, patterns and defaults, each error naming the document and the field path), the CRD's
structural OpenAPI v3 schema with its CEL rules (``openapi``), ``fill_defaults`` (what the API
server does to a stored CR) and the dataclass defaults the rest of the code sees.

Fields are read, and listed in the CRD, in the order they are declared, so the first error in a
document with several is the first field's. Rules between fields: ``when=(sibling, value)``
(required when the sibling has that value, forbidden otherwise), ``together=group`` (all of a
group or none), ``Rule`` on the model (a CEL rule, and the Python check the parser runs), and
``after=`` (a parser hook for what no rule expresses, such as the seed's shorthand).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar, dataclass_transform, overload

from protos.durations import DURATION_PATTERN, parse_duration

T = TypeVar("T")
M = TypeVar("M")

_MISSING: Any = dataclasses.MISSING
_META = "holysheep.schema"
# The parser rejects durations under 1ms everywhere (a zero timeout is never meant); a field
# with a higher floor also gets a CEL rule, so the API server refuses it too.
MIN_DURATION = "1ms"


class ConfigError(ValueError):
    """An invalid HolySheepConfig; the message names the document and the field."""

    def __init__(self, where: str, path: str, problem: str) -> None:
        self.where = where
        self.path = path
        self.problem = problem
        super().__init__(f"{where}: {path}: {problem}" if path else f"{where}: {problem}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "integer", float: "number", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


class Reader:
    """Reads one document: the place errors name, and the names each keyed list has defined so
    far (for ``Arr(key=...)`` uniqueness and ``Str(ref=...)`` references)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.names: dict[str, dict[str, str | None]] = {}

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.where, path, problem)

    def mapping(self, value: Any, path: str, allowed: Iterable[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be an object, got {_kind(value)}")
        known = set(allowed)
        for k in value:
            if k not in known:
                where = f"{path}.{k}" if path else str(k)
                raise self.fail(where, f"unknown field (allowed: {', '.join(sorted(known))})")
        return value

    def any_mapping(self, value: Any, path: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"must be an object, got {_kind(value)}")
        return value


# --- nodes: what a value is on the wire, how the parser reads it, what the CRD says ----------


class Node(Generic[T]):
    def read(self, r: Reader, value: Any, path: str) -> T:
        raise NotImplementedError

    def absent(self, r: Reader, path: str) -> T:
        """A required field that is missing: read as null, so the message says what it must be."""
        return self.read(r, None, path)

    def openapi(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Str(Node[str]):
    """A non-empty string. ``pattern`` is checked by both the parser and the API server;
    ``problem`` replaces the parser's "is not valid" message; ``check`` (returns a problem or
    None) replaces the pattern in the parser where a precise message helps, the pattern staying
    the API server's. ``echo=False`` for fields where a pasted secret is a likely mistake: errors
    then describe the value without repeating it. ``ref`` names a keyed list (``Arr(noun=...)``)
    the value must be a name of."""

    pattern: str | None = None
    hint: str = ""
    _: dataclasses.KW_ONLY
    problem: str | None = None
    check: Callable[[str], str | None] | None = None
    echo: bool = True
    max_length: int | None = None
    ref: str | None = None

    def read(self, r: Reader, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise r.fail(path, f"must be a non-empty string, got {_kind(value)}")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise r.fail(path, problem)
        elif self.pattern is not None and not re.match(self.pattern, value):
            if self.problem:
                raise r.fail(path, self.problem)
            shown = repr(value) if self.echo else f"the value ({len(value)} characters, not shown)"
            raise r.fail(path, f"{shown} is not valid{': ' + self.hint if self.hint else ''}")
        if self.max_length is not None and len(value) > self.max_length:
            raise r.fail(path, f"must be at most {self.max_length} characters")
        if self.ref is not None:
            names = r.names.get(self.ref, {})
            if value not in names:
                raise r.fail(path, f"no {self.ref} named {value!r} (have: {', '.join(names)})")
        return value

    def openapi(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string", "minLength": 1}
        if self.pattern:
            s["pattern"] = self.pattern
        if self.max_length is not None:
            s["maxLength"] = self.max_length
        return s


class Enum(Node[str]):
    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def read(self, r: Reader, value: Any, path: str) -> str:
        if value is False and "Off" in self.choices:
            value = "Off"  # YAML 1.1 (PyYAML, kubectl) reads an unquoted Off as false
        if value not in self.choices:
            raise r.fail(path, f"must be one of {', '.join(self.choices)}, got {value!r}")
        return str(value)

    def openapi(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.choices)}


class Int(Node[int]):
    def __init__(self, minimum: int, maximum: int | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def read(self, r: Reader, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise r.fail(path, f"must be an integer, got {_kind(value)}")
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            bound = f"between {self.minimum} and {self.maximum}" if self.maximum is not None else f">= {self.minimum}"
            raise r.fail(path, f"must be {bound}, got {value}")
        return value

    def openapi(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "integer", "minimum": self.minimum}
        if self.maximum is not None:
            s["maximum"] = self.maximum
        return s


class Num(Node[float]):
    def __init__(self, minimum: int = 0) -> None:
        self.minimum = minimum

    def read(self, r: Reader, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < self.minimum:
            raise r.fail(path, f"must be a number >= {self.minimum}, got {value!r}")
        return float(value)

    def openapi(self) -> dict[str, Any]:
        return {"type": "number", "minimum": self.minimum}


class Bool(Node[bool]):
    def read(self, r: Reader, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise r.fail(path, f"must be true or false, got {_kind(value)}")
        return value

    def openapi(self) -> dict[str, Any]:
        return {"type": "boolean"}


class Dur(Node[float]):
    """A Go/Kubernetes duration string (``30s``, ``1m30s``), read as seconds."""

    def __init__(self, minimum: str = MIN_DURATION) -> None:
        self.minimum = minimum
        self._floor = parse_duration(minimum)

    def read(self, r: Reader, value: Any, path: str) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise r.fail(path, str(exc)) from None
        if seconds < self._floor:
            raise r.fail(path, f"must be at least {self.minimum}")
        return seconds

    def openapi(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string", "pattern": DURATION_PATTERN}
        if self.minimum != MIN_DURATION:
            s["x-kubernetes-validations"] = [
                {"rule": f"duration(self) >= duration('{self.minimum}')", "message": f"must be at least {self.minimum}"}
            ]
        return s


class Obj(Node[M]):
    """An object whose fields are a @model class's."""

    def __init__(self, cls: type[M]) -> None:
        self.cls = cls

    def read(self, r: Reader, value: Any, path: str) -> M:
        return read_model(r, self.cls, value, path)

    def absent(self, r: Reader, path: str) -> M:
        raise r.fail(path, "is required")

    def openapi(self) -> dict[str, Any]:
        return openapi(self.cls)


class Arr(Node[tuple[T, ...]]):
    """A list, read as a tuple. With ``key`` (an item attribute) the list is a Kubernetes map
    list: the key is unique, and its values are the names ``Str(ref=noun)`` may refer to.
    ``max_items`` bounds a list whose items carry CEL rules (the API server refuses a CRD whose
    rules' estimated cost over an unbounded list is too high)."""

    def __init__(self, item: Node[T], min_items: int = 0, *, key: str | None = None, noun: str = "",
                 max_items: int | None = None) -> None:
        if key is not None and not noun:
            raise TypeError("a keyed Arr needs a noun for its messages")
        self.item = item
        self.min_items = min_items
        self.max_items = max_items
        self.key = key
        self.noun = noun

    def read(self, r: Reader, value: Any, path: str) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise r.fail(path, f"must be a list, got {_kind(value)}")
        if len(value) < self.min_items:
            raise r.fail(path, f"must have at least {self.min_items} item(s)")
        if self.max_items is not None and len(value) > self.max_items:
            raise r.fail(path, f"must have at most {self.max_items} item(s)")
        names = r.names.setdefault(self.noun, {}) if self.key is not None else {}
        out = []
        for i, v in enumerate(value):
            item = self.item.read(r, v, f"{path}[{i}]")
            if self.key is not None:
                name = getattr(item, self.key)
                if name in names:
                    origin = names[name]
                    hint = f" (the name {name!r} is taken by {origin})" if origin else ""
                    raise r.fail(f"{path}[{i}].{camel(self.key)}", f"duplicate {self.noun} name {name!r}{hint}")
                names[name] = None
            out.append(item)
        return tuple(out)

    def openapi(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "array"}
        if self.min_items:
            s["minItems"] = self.min_items
        if self.max_items is not None:
            s["maxItems"] = self.max_items
        s["items"] = self.item.openapi()
        if self.key is not None:
            s["x-kubernetes-list-type"] = "map"
            s["x-kubernetes-list-map-keys"] = [camel(self.key)]
        return s


class Map(Node[Mapping[str, T]]):
    """An object with any keys (labels, selectors); the values are checked, the keys are not."""

    def __init__(self, values: Node[T]) -> None:
        self.values = values

    def read(self, r: Reader, value: Any, path: str) -> Mapping[str, T]:
        m = r.any_mapping(value, path)
        return {k: self.values.read(r, v, f"{path}.{k}") for k, v in m.items()}

    def openapi(self) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": self.values.openapi()}


# --- fields and models --------------------------------------------------------------------

Hook = Callable[[Reader, Any, Mapping[str, Any]], Any]
_DEFAULTS = Reader("schema default")


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule over one object's fields: ``cel`` for the API server; ``check`` (over the fields
    read, by Python name) for the parser, which reports ``problem`` (default: ``message``) at
    the object's path. A rule without ``check`` is enforced by the parser elsewhere (say where)."""

    cel: str
    message: str
    check: Callable[[Mapping[str, Any]], bool] | None = None
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str
    wire: str
    node: Node[Any]
    default: Any  # the wire default, _MISSING or None (absent stays absent)
    required: bool
    description: str
    when: tuple[str, str] | None
    together: str | None
    after: Hook | None
    python_default: Any  # the default as the parser returns it, or _MISSING
    factory: Callable[[], Any] | None


def field(
    node: Node[T],
    *,
    default: Any = _MISSING,
    default_factory: Callable[[], Any] = _MISSING,
    description: str = "",
    when: tuple[str, str] | None = None,
    together: str | None = None,
    after: Hook | None = None,
) -> T:
    """One CR field (see the module docstring)."""
    kw: dict[str, Any] = {}
    python_default: Any = _MISSING
    factory = None if default_factory is _MISSING else default_factory
    if default is not _MISSING:
        # Read through the node: a default the parser would reject fails at import.
        python_default = None if default is None else node.read(_DEFAULTS, copy.deepcopy(default), "default")
        try:
            hash(python_default)
            kw["default"] = python_default
        except TypeError:  # a dict: dataclasses want a factory
            factory = kw["default_factory"] = lambda: copy.deepcopy(python_default)
    elif factory is not None:
        kw["default_factory"] = factory
    info = {
        "node": node, "default": default, "description": description, "when": when, "together": together,
        "after": after, "python_default": python_default, "factory": factory,
        "required": default is _MISSING and factory is None and when is None and together is None,
    }
    result: T = dataclasses.field(metadata={_META: info}, **kw)
    return result


@overload
def model(cls: type[M], /) -> type[M]: ...
@overload
def model(*, rules: tuple[Rule, ...] = ()) -> Callable[[type[M]], type[M]]: ...
@dataclass_transform(frozen_default=True, field_specifiers=(field, dataclasses.field))
def model(cls: Any = None, /, *, rules: tuple[Rule, ...] = ()) -> Any:
    """A frozen dataclass whose ``field(...)`` fields are CR fields, with rules between them."""

    def wrap(c: Any) -> Any:
        c = dataclasses.dataclass(frozen=True)(c)
        c.__schema_rules__ = rules
        c.__schema_fields__ = tuple(
            FieldInfo(name=f.name, wire=camel(f.name), **f.metadata[_META])
            for f in dataclasses.fields(c) if _META in f.metadata
        )
        return c

    return wrap if cls is None else wrap(cls)


def fields_of(cls: type[Any]) -> tuple[FieldInfo, ...]:
    """The CR fields of a model, in declaration order (fields without ``field(...)`` are not
    on the wire: the document's name, namespace and raw form)."""
    result: tuple[FieldInfo, ...] = cls.__schema_fields__  # type: ignore[attr-defined]
    return result


def _groups(infos: Iterable[FieldInfo]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for f in infos:
        if f.together is not None:
            groups.setdefault(f.together, []).append(f.wire)
    return groups


def read_model(r: Reader, cls: type[M], value: Any, path: str, **extra: Any) -> M:
    """Parse one object into ``cls``; ``extra`` fills the fields that are not on the wire."""
    infos = fields_of(cls)
    m = r.mapping(value, path, [f.wire for f in infos])
    groups = _groups(infos)
    parsed: dict[str, Any] = {}
    for f in infos:
        fpath = f"{path}.{f.wire}"
        required = f.required
        if f.when is not None:
            sibling, wanted = f.when
            if parsed[sibling] == wanted:
                required = True
            elif f.wire in m:
                raise r.fail(fpath, f"only allowed with {camel(sibling)} {wanted}")
        if f.together is not None and any(w in m for w in groups[f.together]):
            required = True
        if f.wire in m:
            v = f.node.read(r, m[f.wire], fpath)
        elif required:
            v = f.node.absent(r, fpath)
        elif f.factory is not None:
            v = f.factory()
        else:
            v = None if f.python_default is _MISSING else copy.deepcopy(f.python_default)
        parsed[f.name] = f.after(r, v, parsed) if f.after is not None else v
    for rule in getattr(cls, "__schema_rules__", ()):
        if rule.check is not None and not rule.check(parsed):
            raise r.fail(path, rule.problem or rule.message)
    return cls(**parsed, **extra)


def openapi(cls: type[Any]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model, as the CRD carries it."""
    infos = fields_of(cls)
    groups = _groups(infos)
    properties: dict[str, Any] = {}
    required: list[str] = []
    validations: list[dict[str, str]] = []
    for f in infos:
        s: dict[str, Any] = {"description": f.description} if f.description else {}
        s.update(f.node.openapi())
        if f.default is not _MISSING and f.default is not None:
            s["default"] = f.default
        properties[f.wire] = s
        if f.required:
            required.append(f.wire)
        if f.when is not None:
            sibling, wanted = camel(f.when[0]), f.when[1]
            validations.append({
                "rule": f"self.{sibling} == '{wanted}' ? has(self.{f.wire}) : !has(self.{f.wire})",
                "message": f"{f.wire} is required with {sibling} {wanted} and only allowed with it",
            })
        if f.together is not None and groups[f.together][0] == f.wire:
            members = groups[f.together]
            validations.append({
                "rule": " && ".join(f"has(self.{a}) == has(self.{b})" for a, b in itertools.pairwise(members)),
                "message": f"{' and '.join(members)} go together",
            })
    validations += [{"rule": rule.cel, "message": rule.message} for rule in getattr(cls, "__schema_rules__", ())]
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    if validations:
        out["x-kubernetes-validations"] = validations
    return out


def fill_defaults(value: Any, schema: Mapping[str, Any]) -> Any:
    """Defaults as the API server applies them: to absent fields of objects that are present."""
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        out = dict(value)
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        return {k: fill_defaults(v, props[k]) if k in props else v for k, v in out.items()}
    if isinstance(value, list) and schema.get("type") == "array":
        return [fill_defaults(v, schema.get("items", {})) for v in value]
    return value
