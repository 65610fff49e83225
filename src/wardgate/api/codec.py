"""YAML/JSON codec for resources (and any strict pydantic model read from YAML, like the config).

People edit resources and `wardgate.yaml` by hand, so a mistake must come back as
`roles.yaml:12: spec.allow.logins: Input should be a valid list`, not as a pydantic dump:
the YAML is composed node by node so every key and list item knows its line, and pydantic's
error locations are mapped back to the deepest node that exists.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from wardgate.api.resources import KINDS, Resource, resolve_kind
from wardgate.errors import BadParameterError

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BaseDumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class ParseError(BadParameterError):
    """A resource or config file that does not validate; says where (file, line, field) and why.

    `more` holds the other problems found in the same document, so one run shows them all.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str = "<input>",
        line: int | None = None,
        field: str | None = None,
        more: Iterable[ParseError] = (),
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.field = field
        self.more = list(more)
        super().__init__(str(self))

    @property
    def problems(self) -> list[ParseError]:
        """This problem and the others found with it, in document order."""
        return [self, *self.more]

    def _one(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"

    def __str__(self) -> str:
        return "\n".join(p._one() for p in self.problems)


# ---------------------------------------------------------------- line maps


class _Lines:
    """The path -> line table of one parsed text, built on first use when given a builder."""

    def __init__(self, lines: dict[Loc, int] | Callable[[], dict[Loc, int]] | None) -> None:
        self._lines = lines

    def get(self) -> dict[Loc, int]:
        if callable(self._lines):
            try:
                self._lines = self._lines()
            except ParseError:
                self._lines = {}
        return self._lines or {}


class LineMap:
    """Where each key / list item of one parsed document sits: path tuple -> 1-based line.

    Built from YAML nodes; for JSON input it is computed lazily (only when an error needs it).
    `prefix` lets a sub-document (one item of a top-level list) share its parent's table.
    """

    def __init__(
        self,
        lines: dict[Loc, int] | Callable[[], dict[Loc, int]] | _Lines | None = None,
        prefix: Loc = (),
    ) -> None:
        self._table = lines if isinstance(lines, _Lines) else _Lines(lines)
        self.prefix = prefix

    def sub(self, *prefix: str | int) -> LineMap:
        """The map of the node at `prefix`, with paths relative to it."""
        return LineMap(self._table, self.prefix + prefix)

    def as_dict(self) -> dict[Loc, int]:
        """Every known path (relative to this map's prefix) and its line."""
        n = len(self.prefix)
        return {k[n:]: v for k, v in self._table.get().items() if k[:n] == self.prefix}

    def line_for(self, loc: Sequence[str | int] = ()) -> int | None:
        """Line of the deepest node along `loc` that exists in the document (None if unknown)."""
        lines = self._table.get()
        full = self.prefix + tuple(loc)
        for n in range(len(full), -1, -1):
            line = lines.get(full[:n])
            if line is not None:
                return line
        return None


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


_MERGE_TAG = "tag:yaml.org,2002:merge"


_MAX_LINES = 200_000
"""Stop recording lines past this many entries (aliases can make a small file a huge tree)."""


def _index_node(
    node: yaml.Node,
    path: Loc,
    lines: dict[Loc, int],
    loader: yaml.SafeLoader,
    source: str,
    seen: set[int],
    budget: list[int],
) -> None:
    """Record the line of every key and item under `node`; reject duplicate keys.

    Runs before construction, so `<<: *anchor` merges are still visible: merged keys get the
    anchor's lines unless the mapping sets them itself (overriding a merged key is no duplicate).
    """
    if id(node) in seen or budget[0] <= 0:  # recursive alias, or alias bomb: stop here
        return
    budget[0] -= len(node.value) if isinstance(node, yaml.CollectionNode) else 0
    seen = seen | {id(node)}
    if isinstance(node, yaml.MappingNode):
        local: dict[Any, int] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.extend(value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node])
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise ParseError(
                    "a mapping key must be a plain value", source=source, line=_line(key_node)
                ) from None
            if key in local:
                raise ParseError(
                    f"duplicate key {key!r} (first at line {local[key]})",
                    source=source,
                    line=_line(key_node),
                    field=format_path((*path, key)),
                )
            local[key] = _line(key_node)
            lines[(*path, key)] = _line(key_node)
            _index_node(value_node, (*path, key), lines, loader, source, seen, budget)
        for src in merged:
            sub: dict[Loc, int] = {}
            _index_node(src, path, sub, loader, source, seen, budget)
            n = len(path)
            for loc, line in sub.items():
                if len(loc) > n and loc[n] not in local:
                    lines.setdefault(loc, line)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = _line(item)
            _index_node(item, (*path, i), lines, loader, source, seen, budget)


def _yaml_error(exc: yaml.YAMLError, source: str) -> ParseError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        context = exc.context
        if context and exc.context_mark is not None and exc.context_mark is not mark:
            context += f" (line {exc.context_mark.line + 1})"
        parts = [p for p in (context, exc.problem) if p]
        text = ": ".join(parts) if parts else "syntax error"
        return ParseError(
            f"invalid YAML: {text}", source=source, line=mark.line + 1 if mark is not None else None
        )
    return ParseError(f"invalid YAML: {exc}", source=source)


def yaml_documents_with_lines(text: str | bytes, source: str = "<input>") -> list[tuple[Any, LineMap]]:
    """Parse every YAML document (`---` separated) into plain data plus its LineMap.

    Empty documents come back as `(None, map)`; callers decide whether to skip them.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    loader = _Loader(text)
    out: list[tuple[Any, LineMap]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            lines: dict[Loc, int] = {(): _line(node)}
            # index before construction, which flattens `<<` merges in place
            _index_node(node, (), lines, loader, source, set(), [_MAX_LINES])
            data = loader.construct_document(node)
            out.append((data, LineMap(lines)))
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    finally:
        loader.dispose()
    return out


# ---------------------------------------------------------------- pydantic errors -> ParseError

_IDENT = re.compile(r"^[A-Za-z0-9_-]+$")


def format_path(loc: Sequence[str | int]) -> str:
    """('spec', 'allow', 'logins', 0) -> 'spec.allow.logins[0]'; odd keys are quoted."""
    out = ""
    for el in loc:
        if isinstance(el, int) and not isinstance(el, bool):
            out += f"[{el}]"
        elif _IDENT.match(str(el)):
            out += f".{el}" if out else str(el)
        else:
            out += f"[{json.dumps(str(el))}]"
    return out


def _error_path(data: Any, loc: Loc) -> Loc:
    """The part of pydantic's `loc` that names the user's data.

    Steps past what exists are kept when they name a missing key of a mapping (a required
    field, or a check on a defaulted section) and dropped when they descend into a scalar or
    list (pydantic's union-branch tags such as `str` or `list[str]`).
    """
    cur, n = data, 0
    for el in loc:
        in_dict = isinstance(cur, dict) and el in cur
        in_list = isinstance(cur, list) and isinstance(el, int) and 0 <= el < len(cur)
        if not (in_dict or in_list):
            break
        cur = cur[el]
        n += 1
    return loc if isinstance(cur, dict) else loc[:n]


def _candidates(tp: Any, el: str | int) -> list[Any]:
    """Types reachable from `tp` by stepping into `el` (field, list item or dict value)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _candidates(typing.get_args(tp)[0], el)
    if origin in (typing.Union, types.UnionType):
        return [c for a in typing.get_args(tp) for c in _candidates(a, el)]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        f = tp.model_fields.get(str(el))
        return [f.annotation] if f is not None else []
    if origin in (list, tuple, set, frozenset, Sequence) and isinstance(el, int):
        return list(typing.get_args(tp)[:1])
    if origin is dict:
        args = typing.get_args(tp)
        return [args[1]] if len(args) == 2 else []
    return []


def _field_names_at(model_cls: type[BaseModel], path: Sequence[str | int]) -> list[str]:
    level: list[Any] = [model_cls]
    for el in path:
        level = [c for tp in level for c in _candidates(tp, el)]
    names: list[str] = []
    for tp in level:
        for t in [tp, *typing.get_args(tp)]:
            if isinstance(t, type) and issubclass(t, BaseModel):
                names.extend(n for n in t.model_fields if n not in names)
    return names


def _got(value: Any) -> str | None:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str) and len(value) <= 60:
        return json.dumps(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return None


_PREFIXES = ("Value error, ", "Assertion failed, ")
_OWN_WORDS = {"missing", "extra_forbidden", "value_error", "assertion_error"}
"""Error types whose message is complete: validators name the bad value themselves."""


def _clean(err: dict[str, Any], model_cls: type[BaseModel] | None, path: Loc) -> str:
    typ = err.get("type", "")
    if typ == "missing":
        return "field required"
    if typ == "extra_forbidden":
        names = _field_names_at(model_cls, path[:-1]) if model_cls is not None and path else []
        close = difflib.get_close_matches(str(path[-1]), names, n=1, cutoff=0.6) if path else []
        return (
            f"unknown field (check the spelling; did you mean {close[0]!r}?)"
            if close
            else ("unknown field (check the spelling)")
        )
    msg = str(err.get("msg", "invalid value"))
    for p in _PREFIXES:
        if msg.startswith(p):
            msg = msg[len(p) :]
    if typ in ("model_type", "model_attributes_type", "dict_type"):
        got = _got(err.get("input"))
        return f"expected a mapping of fields (key: value), got {got or 'something else'}"
    return msg


def from_validation_error(
    exc: ValidationError,
    *,
    source: str = "<input>",
    data: Any = None,
    lines: LineMap | None = None,
    model_cls: type[BaseModel] | None = None,
) -> ParseError:
    """Turn pydantic's errors into one ParseError naming file, line and dotted field for each."""
    grouped: dict[Loc, list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        path = _error_path(data, loc) if data is not None else loc
        grouped.setdefault(path, []).append(err)

    problems: list[ParseError] = []
    for path, errs in grouped.items():
        msgs: list[str] = []
        for e in errs:
            m = _clean(e, model_cls, path)
            if m not in msgs:
                msgs.append(m)
        lead = "Input should be "
        if len(msgs) > 1 and all(m.startswith(lead) for m in msgs):
            msg = lead + " or ".join(m[len(lead) :] for m in msgs)
        else:
            msg = "; ".join(msgs)
        first = errs[0]
        if first.get("type") not in _OWN_WORDS and not msg.startswith("expected a mapping"):
            got = _got(first.get("input"))
            raw = first.get("input")
            seen = got is None or got in msg or (isinstance(raw, str) and repr(raw) in msg)
            if not seen and not got.startswith("a "):
                msg += f" (got {got})"
        problems.append(
            ParseError(
                msg,
                source=source,
                line=lines.line_for(path) if lines is not None else None,
                field=format_path(path) or None,
            )
        )
    problems.sort(key=lambda p: (p.line is None, p.line or 0))
    head, *rest = problems or [ParseError("invalid input", source=source)]
    head.more = rest
    head.args = (str(head),)
    return head


def validate_data(model_cls: type[M], data: Any, source: str = "<input>", lines: LineMap | None = None) -> M:
    """model_validate with errors turned into ParseError (lines when a LineMap is given)."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, source=source, data=data, lines=lines, model_cls=model_cls) from None


def validate_yaml(model_cls: type[M], text: str | bytes, source: str = "<input>") -> M:
    """Validate a single-document YAML file (an empty file means all defaults)."""
    docs = [(d, lm) for d, lm in yaml_documents_with_lines(text, source) if d is not None]
    if len(docs) > 1:
        raise ParseError(
            f"expected one YAML document, found {len(docs)}",
            source=source,
            line=docs[1][1].line_for(),
        )
    data, lines = docs[0] if docs else ({}, LineMap({}))
    return validate_data(model_cls, data, source, lines)


# ---------------------------------------------------------------- resources


def _resource(data: Any, source: str, lines: LineMap | None) -> Resource:
    line = lines.line_for() if lines is not None else None
    if not isinstance(data, dict):
        raise ParseError(
            f"expected a resource (a mapping with kind, version, metadata, spec), got {_got(data)}",
            source=source,
            line=line,
        )
    known = ", ".join(sorted(KINDS))
    kind = data.get("kind")
    if kind is None:
        raise ParseError(f"missing kind: expected one of {known}", source=source, line=line)
    if not isinstance(kind, str):
        raise ParseError(
            f"kind must be a string: expected one of {known}",
            source=source,
            line=lines.line_for(("kind",)) if lines is not None else None,
            field="kind",
        )
    try:
        canonical = resolve_kind(kind)
    except ValueError as exc:
        raise ParseError(
            str(exc),
            source=source,
            line=lines.line_for(("kind",)) if lines is not None else None,
            field="kind",
        ) from None
    if canonical != kind:
        data = {**data, "kind": canonical}
    return validate_data(KINDS[canonical], data, source, lines)


def resource_from_dict(d: dict[str, Any], source: str = "<input>") -> Resource:
    """Validate plain data (parsed JSON, API bodies) as the resource its `kind` names."""
    return _resource(d, source, None)


def _json_lines(text: str, source: str) -> Callable[[], dict[Loc, int]]:
    def build() -> dict[Loc, int]:
        docs = yaml_documents_with_lines(text, source)
        return docs[0][1].as_dict() if len(docs) == 1 else {}

    return build


def load_resources(text: str | bytes, source: str = "<stdin>") -> list[Resource]:
    """Read resources from YAML (one or more documents, or a list) or JSON (object or list)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text.removeprefix("\ufeff")
    docs: list[tuple[Any, LineMap]] | None = None
    if text.lstrip()[:1] in ("{", "["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            docs = None  # maybe YAML flow style; the YAML parser reports syntax errors with lines
        else:
            docs = [(parsed, LineMap(_json_lines(text, source)))]
    if docs is None:
        docs = yaml_documents_with_lines(text, source)

    out: list[Resource] = []
    for data, lines in docs:
        if data is None:
            continue
        if isinstance(data, list):
            out.extend(_resource(item, source, lines.sub(i)) for i, item in enumerate(data))
        else:
            out.append(_resource(data, source, lines))
    return out


def resource_to_dict(r: Resource) -> dict[str, Any]:
    """JSON-mode dict: RFC 3339 times, durations like "12h", every option shown, no empty revision."""
    d = r.model_dump(mode="json")
    if d.get("metadata", {}).get("revision") is None:
        d.get("metadata", {}).pop("revision", None)
    return d


def _as_list(resources: Resource | Sequence[Resource]) -> list[Resource]:
    return [resources] if isinstance(resources, Resource) else list(resources)


class _Dumper(_BaseDumper):
    """Block style; multi-line strings (PEM keys, certificates) as readable `|` literals."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def dump_yaml(resources: Resource | Sequence[Resource]) -> str:
    """YAML documents separated by `---`, fields in model order."""
    items = [resource_to_dict(r) for r in _as_list(resources)]
    if not items:
        return ""
    return yaml.dump_all(
        items,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=100,
    )


def dump_json(resources: Resource | Sequence[Resource]) -> str:
    """Indented JSON: an object for one resource, a list for a sequence."""
    if isinstance(resources, Resource):
        return json.dumps(resource_to_dict(resources), indent=2, ensure_ascii=False) + "\n"
    return json.dumps([resource_to_dict(r) for r in resources], indent=2, ensure_ascii=False) + "\n"


_KIND_FIRST = re.compile(rb'^\s*\{\s*"kind"\s*:\s*"([A-Za-z0-9_]+)"')


def resource_from_json(data: bytes | str) -> Resource:
    """Decode compact JSON (storage, API); validates straight from bytes when `kind` comes first."""
    raw = data.encode() if isinstance(data, str) else data
    m = _KIND_FIRST.match(raw)
    if m is not None:
        kind = m.group(1).decode()
        cls = KINDS.get(kind)
        if cls is not None:
            try:
                return cls.model_validate_json(raw)
            except ValidationError as exc:
                parsed = _json_or_error(raw)
                raise from_validation_error(exc, source="<json>", data=parsed, model_cls=cls) from None
    return _resource(_json_or_error(raw), "<json>", None)


def _json_or_error(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ParseError(f"invalid JSON: {exc}", source="<json>", line=getattr(exc, "lineno", None)) from None


def resource_to_json(r: Resource) -> bytes:
    """Compact JSON; `metadata.revision` only when set."""
    if r.metadata.revision is None:
        return r.model_dump_json(exclude={"metadata": {"revision"}}).encode()
    return r.model_dump_json().encode()
