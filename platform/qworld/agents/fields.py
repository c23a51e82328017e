"""A learner family's config fields, each declared once: name, default, doc, check.

A family's AlgorithmConfig lists :class:`FieldsConfig` before RLlib's config class and
declares ``FIELDS``, a tuple of :class:`Field` (in the order ``qworld_config.json`` lists
them). Everything else about a field derives from that one entry:

- the attribute and its default (set by ``__init__``; a mutable default is copied);
- ``training(**kw)``: accepts every field with ``keyword=True`` (its signature lists them, so
  ``inspect.signature`` and ``qworld.agents.families.Family.keywords`` -- the agent keywords a
  sweep file may set -- see them); a field with ``rllib=True`` is RLlib's own setting of that
  name and goes on to RLlib's ``training()`` (which checks and stores it); the others are
  set here (``store`` first: widths as lists, env kwargs as a dict);
- ``qworld_errors()`` / ``validate_fields()``: every field's ``check`` in table order, each
  bad one as ``ERROR_FORMAT`` (``"lr=0: must be a number > 0"``) or as the whole
  :class:`Message` its check returns;
- ``qworld_config()``: the fields as JSON, the trial config every checkpoint holds;
- the docs: :func:`fields_markdown` (``docs/AGENT_CONFIG.md`` is generated from it and a
  test keeps the two equal) and ``training.__doc__``.

A field with ``alias`` is stored in RLlib's setting of that name, not in a copy of its own
(``env_id`` is RLlib's ``env``, ``env_kwargs`` its ``env_config``, ``rollout_length`` its
``rollout_fragment_length``, ...): ``.environment(env_config=...)`` and
``.training(env_kwargs=...)`` write the same setting, the last one wins. ``to_dict()`` lists
the field's name as well (Tune's trial configs and sweep axes use it) and
``update_from_dict`` applies the field's name after RLlib's, so a sweep axis on
``env_kwargs`` wins over the ``env_config`` beside it.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ray.rllib.algorithms.algorithm_config import NotProvided

ALGORITHM_KEY = "algorithm"  # the family's name in a trial config (qworld.agents.families)


class Message(str):
    """A check's whole error message (instead of ``must be <allowed>``)."""


Check = Callable[[Any, Any], Optional[str]]  # (value, config) -> None (fine), allowed text, or a Message


@dataclass(frozen=True)
class Field:
    """One config field of a learner family.

    Attributes:
        name: the attribute, ``training()`` keyword and trial-config key.
        default: its default (copied for every config).
        doc: what it is, for ``training()``'s doc and ``docs/AGENT_CONFIG.md``.
        check: ``(value, config) -> None | allowed | Message``; None: no check.
        keyword: accepted by ``training()`` (and so in a sweep file's ``agent`` section).
        rllib: RLlib's own setting of this name (``gamma``, ``lr``, ...): ``training()``
            hands it to RLlib's ``training()``.
        alias: the RLlib setting that stores this field (``env_id`` -> ``env``).
        store: applied to a value given to ``training()`` before it is set.
    """

    name: str
    default: Any
    doc: str
    check: Optional[Check] = None
    keyword: bool = True
    rllib: bool = False
    alias: Optional[str] = None
    store: Optional[Callable[[Any], Any]] = None


# ---------------------------------------------------------------------- value tests
def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_num(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def need(ok: Callable[[Any], bool], allowed: str) -> Check:
    """A check: ``allowed`` unless ``ok(value)``."""
    return lambda value, config: None if ok(value) else allowed


def int_at_least(lo: int, allowed: Optional[str] = None) -> Check:
    return need(lambda v: is_int(v) and v >= lo, allowed or f"an int >= {lo}")


def number_above(lo: float, allowed: Optional[str] = None) -> Check:
    return need(lambda v: is_num(v) and v > lo, allowed or f"a number > {lo:g}")


def number_at_least(lo: float, allowed: Optional[str] = None) -> Check:
    return need(lambda v: is_num(v) and v >= lo, allowed or f"a number >= {lo:g}")


def unit_interval(allowed: str = "a number in [0, 1]") -> Check:
    return need(lambda v: is_num(v) and 0 <= v <= 1, allowed)


def one_of(choices: Sequence[Any]) -> Check:
    return need(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def widths(allowed: str = "a non-empty list of ints >= 1") -> Check:
    return need(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(is_int(h) and h >= 1 for h in v),
                allowed)


def as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def as_dict(value: Any) -> Any:
    return dict(value) if value is not None else value


# ---------------------------------------------------------------------- the config mixin
class FieldsConfig:
    """The part of a family's AlgorithmConfig that its ``FIELDS`` table gives (module doc).

    A family sets ``FIELDS``, ``ALGORITHM_NAME`` and, where it differs from RLlib's,
    ``RLLIB_DEFAULTS`` (RLlib settings the family starts from, e.g. ``num_env_runners: 0``);
    ``CONFIG_HEAD`` (trial-config keys before the fields) and ``ERROR_FORMAT`` as it needs.
    """

    FIELDS: Tuple[Field, ...] = ()
    ALGORITHM_NAME: str = ""
    RLLIB_DEFAULTS: Mapping[str, Any] = {}
    CONFIG_HEAD: Mapping[str, Any] = {}
    ERROR_FORMAT = "{name}={value!r}: must be {allowed}"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "FIELDS" in vars(cls):
            _install_fields(cls)

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class)
        for f in self.FIELDS:
            setattr(self, f.name, copy.deepcopy(f.default))
        for name, value in self.RLLIB_DEFAULTS.items():
            setattr(self, name, copy.deepcopy(value))

    # ------------------------------------------------------------------ the table
    @classmethod
    def field(cls, name: str) -> Field:
        return next(f for f in cls.FIELDS if f.name == name)

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """Every field, in table order (the trial config's order)."""
        return tuple(f.name for f in cls.FIELDS)

    @classmethod
    def training_keywords(cls) -> Tuple[str, ...]:
        """The fields ``training()`` accepts: a sweep file's agent keywords for this family."""
        return tuple(f.name for f in cls.FIELDS if f.keyword)

    # ------------------------------------------------------------------ checks
    def qworld_errors(self) -> List[str]:
        """Every bad field, one message each, in table order (empty when valid; no env is built
        beyond what a check needs)."""
        errors: List[str] = []
        for f in self.FIELDS:
            if f.check is None:
                continue
            value = getattr(self, f.name)
            verdict = f.check(value, self)
            if verdict is not None:
                errors.append(verdict if isinstance(verdict, Message)
                              else self.ERROR_FORMAT.format(name=f.name, value=value, allowed=verdict))
        return errors + self.more_errors(errors)

    def more_errors(self, errors: List[str]) -> List[str]:
        """Checks of the whole config a family adds after the fields' (given their errors)."""
        return []

    def validate_fields(self) -> None:
        """ValueError naming every bad field with its allowed values."""
        errors = self.qworld_errors()
        if errors:
            raise ValueError(f"invalid {type(self).__name__}:\n  - " + "\n  - ".join(errors))

    def validate_problem(self) -> None:
        """ValueError naming ``env_id`` and ``env_kwargs`` when the problem cannot be built."""
        try:
            self.problem()
        except Exception as e:
            raise ValueError(f"invalid {type(self).__name__}: env_id={self.env_id!r} with env_kwargs="
                             f"{self.env_kwargs!r} cannot be built: {type(e).__name__}: {e}") from e

    # ------------------------------------------------------------------ trial config
    def resolved_fields(self) -> Dict[str, Any]:
        """Fields whose trial-config value is resolved (``"auto"`` made concrete)."""
        return {}

    def qworld_config(self) -> Dict[str, Any]:
        """The resolved trial config (JSON-able): family, fields, problem, goal set, sizes."""
        from qworld.agents.pqn.problem import jsonable

        out: Dict[str, Any] = {ALGORITHM_KEY: self.ALGORITHM_NAME, **self.CONFIG_HEAD}
        for name in self.field_names():
            out[name] = jsonable(getattr(self, name))
        out.update(self.resolved_fields())
        out.update(self.problem().trial_config())
        return out

    # ------------------------------------------------------------------ dicts and states
    def to_dict(self) -> Dict[str, Any]:
        """RLlib's dict plus every aliased field under its own name (after RLlib's keys)."""
        out = super().to_dict()
        for f in self.FIELDS:
            if f.alias:
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        return out

    def update_from_dict(self, config_dict):
        """RLlib's ``update_from_dict``, aliased fields' own names applied last (they win
        over the RLlib setting they are stored in)."""
        aliased = {f.name for f in self.FIELDS if f.alias}
        super().update_from_dict({k: v for k, v in config_dict.items() if k not in aliased})
        for f in self.FIELDS:
            if f.name in aliased and f.name in config_dict:
                setattr(self, f.name, copy.deepcopy(config_dict[f.name]))
        self.upgrade_saved(config_dict)
        return self

    @classmethod
    def from_state(cls, state: Dict[str, Any]):
        config = super().from_state(state)
        if isinstance(config, FieldsConfig):
            # A state saved before a field became an alias holds it under its own name as
            # well: set it through the alias (the same value RLlib's setting holds).
            for f in config.FIELDS:
                if f.alias and f.name in vars(config):
                    setattr(config, f.name, vars(config).pop(f.name))
            config.upgrade_saved(state)
        return config

    def upgrade_saved(self, saved: Mapping[str, Any]) -> None:
        """Bring a dict / state saved by an older qworld up to date (a family's hook)."""


def _alias_property(f: Field) -> property:
    def get(self):
        return getattr(self, f.alias)

    def set_(self, value):
        setattr(self, f.alias, value)

    return property(get, set_, doc=f"{f.doc} (stored in RLlib's ``{f.alias}``)")


def _install_fields(cls: type) -> None:
    """Aliased fields as properties, and ``training()`` with the table's keywords."""
    names = [f.name for f in cls.FIELDS]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}.FIELDS names a field twice")
    for f in cls.FIELDS:
        if f.alias:
            setattr(cls, f.name, _alias_property(f))
    cls.training = _training_for(cls)


def _training_for(cls: type) -> Callable:
    keywords = {f.name: f for f in cls.FIELDS if f.keyword}

    def training(self, **kwargs):
        ours = {name: kwargs.pop(name) for name in list(kwargs) if name in keywords}
        rllib = {name: v for name, v in ours.items() if keywords[name].rllib and v is not NotProvided}
        super(cls, self).training(**rllib, **kwargs)
        for name, value in ours.items():
            f = keywords[name]
            if value is NotProvided or f.rllib:
                continue
            setattr(self, name, f.store(value) if f.store else value)
        return self

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=NotProvided) for name in keywords]
    params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    training.__signature__ = inspect.Signature(params)
    training.__name__ = "training"
    training.__qualname__ = f"{cls.__name__}.training"
    training.__module__ = cls.__module__
    args = "\n".join(f"    {f.name}: {f.doc} (default {f.default!r}{'; RLlib' if f.rllib else ''})"
                     for f in keywords.values())
    training.__doc__ = (f"Sets {cls.__name__}'s fields (declared once in ``FIELDS``); any other keyword goes "
                        f"to RLlib's ``training()``.\n\nArgs:\n{args}\n\nReturns:\n    This updated config.")
    return training


def fields_markdown(configs: Sequence[Tuple[str, type]]) -> str:
    """``docs/AGENT_CONFIG.md``: one table per family (``(family, config class)`` pairs)."""
    lines = [
        "# Agent config fields",
        "",
        "Generated from each learner family's `FIELDS` table (`qworld.agents.fields`); "
        "`python -m qworld.agents.families --docs > docs/AGENT_CONFIG.md` writes it and "
        "`tests/test_families.py` keeps it equal. A sweep file's `agent` section sets any field "
        "marked as a keyword (besides `algorithm`); \"RLlib's own\" marks RLlib's setting of that name, "
        "\"stored in\" the RLlib setting a field is kept in (no copy of its own).",
        "",
    ]
    for family, cls in configs:
        lines += [f"## `{family}`: `{cls.__module__}.{cls.__name__}`", "",
                  "| field | default | keyword | what |", "|---|---|---|---|"]
        for f in cls.FIELDS:
            where = "; RLlib's own" if f.rllib else (f"; stored in RLlib's `{f.alias}`" if f.alias else "")
            default = repr(f.default).replace("|", "\\|").replace("\n", " ")
            if len(default) > 40:
                default = default[:37] + "..."
            doc = f.doc.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{f.name}` | `{default}` | {'yes' if f.keyword else 'no'} | {doc}{where} |")
        lines.append("")
    return "\n".join(lines)
