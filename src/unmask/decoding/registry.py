"""The registry of policies and the strategy-string parser (`threshold:tau=0.8,temperature=0`)."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from unmask.decoding.policies.base import Policy
from unmask.errors import UnmaskError

_POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available by its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _POLICIES[cls.name] = cls
    return cls


def _load_builtin_policies() -> None:
    import unmask.decoding.policies  # noqa: F401  (each module registers itself)


def policy_names() -> list[str]:
    _load_builtin_policies()
    return list(_POLICIES)


def policy_class(name: str) -> type[Policy]:
    _load_builtin_policies()
    if name not in _POLICIES:
        raise UnmaskError(f"unknown strategy {name!r}; choose one of: {', '.join(_POLICIES)} (see `unmask strategies`)", field="strategy")
    return _POLICIES[name]


def _field_types(config_cls) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def _convert(name: str, key: str, raw: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if isinstance(raw, str) and raw.lower() in ("none", "null", ""):
            return None
        if raw is None:
            return None
        typ = args[0]
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(raw, bool):
                raise ValueError
            number = float(raw)
            if not math.isfinite(number) or not number.is_integer():
                raise ValueError  # 2.5 is not a step count; never truncate silently
            return int(number)
        if typ is float:
            if isinstance(raw, bool):
                raise ValueError
            number = float(raw)
            if not math.isfinite(number):
                raise UnmaskError(f"strategy {name}: parameter {key} must be a finite number, got {raw!r}", field=key)
            return number
        if typ is str:
            return str(raw)
    except (TypeError, ValueError):
        pass
    else:
        return raw
    tname = getattr(typ, "__name__", str(typ))
    raise UnmaskError(f"strategy {name}: parameter {key} must be {tname}, got {raw!r}", field=key)


def build_policy(name: str, params: dict[str, Any] | None = None) -> Policy:
    """Instantiate a registered policy with `params` (strings or values), validated."""
    cls = policy_class(name)
    params = dict(params or {})
    types_ = _field_types(cls.Config)
    known = [f.name for f in fields(cls.Config)]
    values = {}
    for key, raw in params.items():
        if key not in types_:
            raise UnmaskError(
                f"strategy {name} has no parameter {key!r}; its parameters are: {', '.join(known) or 'none'}",
                field=key,
            )
        values[key] = _convert(name, key, raw, types_[key])
    config = cls.Config(**values)
    return cls(config)


def parse_strategy(spec: str) -> Policy:
    """`NAME` or `NAME:key=value,key=value` -> a validated policy instance."""
    if not isinstance(spec, str) or not spec.strip():
        raise UnmaskError("empty strategy; name one of the strategies listed by `unmask strategies`", field="strategy")
    name, _, rest = spec.strip().partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UnmaskError(f"strategy {spec!r}: {item!r} is not key=value (example: threshold:tau=0.8)", field="strategy")
        params[key.strip()] = value.strip()
    return build_policy(name.strip(), params)


def describe_policies() -> list[dict[str, Any]]:
    """Every registered policy with its parameters, defaults and one-line summary.

    A parameter with `departure: true` is an option that departs from the method's paper (off at
    its default); every other default is the paper's (or its public code's) setting.
    """
    out = []
    for name in policy_names():
        cls = _POLICIES[name]
        types_ = _field_types(cls.Config)
        params = []
        for f in fields(cls.Config):
            default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)  # type: ignore[misc]
            typ = types_[f.name]
            params.append({"name": f.name, "type": getattr(typ, "__name__", str(typ).replace("typing.", "")), "default": default,
                           "departure": f.name in cls.departures})
        doc = (cls.__doc__ or "").strip().splitlines()
        out.append({"name": name, "summary": doc[0] if doc else "", "params": params})
    return out
