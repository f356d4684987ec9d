"""Register a PEFT method that lives outside the peft package.

peft 0.21's ``register_peft_method`` only accepts names that already exist in its ``PeftType`` enum, and a
Python ``Enum`` has no public way to grow. ``add_enum_member`` adds one member with the few steps every
CPython from 3.10 to 3.13 agrees on, then checks the result through the enum's public behaviour (lookup by
value, by name, iteration), so a Python whose enum internals differ fails loudly instead of half-working.
"""

from __future__ import annotations

import enum
import sys
from typing import Any


class RegistrationError(RuntimeError):
    """The installed peft (or Python) no longer allows registering an outside PEFT method this way."""


def add_enum_member(enum_cls: type[enum.Enum], name: str, value: Any) -> enum.Enum:
    """Add ``name = value`` to ``enum_cls`` in place and return the member; a no-op if it already exists.

    Works for plain and mixed-in enums (``class PeftType(str, Enum)``). Raises ``RegistrationError`` when
    the name is taken by another value or when the enum does not behave as expected afterwards.
    """
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise RegistrationError(
                f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}, not {value!r}."
            )
        return existing
    try:
        clash = enum_cls(value)
    except ValueError:
        clash = None
    if clash is not None:
        raise RegistrationError(f"Value {value!r} already belongs to {enum_cls.__name__}.{clash.name}.")

    adder = getattr(enum_cls, "_add_member_", None)  # Python >= 3.13 has it (private, but used by enum itself)
    member_type = enum_cls._member_type_
    if member_type is object:
        member = object.__new__(enum_cls)
    else:
        member = member_type.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(*(value if isinstance(value, tuple) else (value,)))  # as enum's own machinery does
    member._sort_order_ = len(enum_cls._member_names_)  # read by Python >= 3.11, harmless before
    try:
        if adder is not None:
            adder(name, member)
        else:
            enum_cls._member_map_[name] = member
            type.__setattr__(enum_cls, name, member)
        if name not in enum_cls._member_names_:
            enum_cls._member_names_.append(name)
        enum_cls._value2member_map_.setdefault(value, member)
    except (AttributeError, TypeError) as exc:  # an enum implementation without these tables
        raise RegistrationError(_python_note(f"could not add {enum_cls.__name__}.{name}: {exc}")) from exc

    problems = []
    if getattr(enum_cls, name, None) is not member:
        problems.append("attribute lookup")
    if enum_cls.__members__.get(name) is not member:
        problems.append("__members__")
    try:
        if enum_cls(value) is not member:
            problems.append("lookup by value")
    except ValueError:
        problems.append("lookup by value")
    if member not in list(enum_cls):
        problems.append("iteration")
    if problems:
        raise RegistrationError(
            _python_note(f"{enum_cls.__name__}.{name} was added but fails {', '.join(problems)}")
        )
    return member


def _python_note(message: str) -> str:
    return f"{message} (Python {sys.version.split()[0]}); please report this to safety-peft."


def register_outside_peft_method(*, name: str, config_cls: type, model_cls: type) -> None:
    """Make ``name`` a PEFT method: extend ``PeftType``, then call ``peft.utils.register_peft_method``.

    Idempotent: registering the same classes again (a re-import, ``importlib.reload``) is a no-op. The PEFT
    type is ``name.upper()`` (value equal to the member name, as for every built-in PEFT type, so configs
    saved as JSON load back) and the adapter attribute prefix is ``name + "_"``.
    """
    import peft
    from peft.utils import PeftType

    try:
        from peft.mapping import (
            PEFT_TYPE_TO_CONFIG_MAPPING,
            PEFT_TYPE_TO_PREFIX_MAPPING,
            PEFT_TYPE_TO_TUNER_MAPPING,
        )
        from peft.utils import register_peft_method
    except ImportError as exc:
        raise RegistrationError(_peft_note(f"peft no longer provides {exc.name or exc}")) from exc

    type_name = name.upper()
    peft_type = add_enum_member(PeftType, type_name, type_name)

    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is not None:
        if _same_class(registered, config_cls) and _same_class(PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type), model_cls):
            # the same method imported twice (or reloaded): point peft at the newest class objects
            PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
            PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
            return
        raise RegistrationError(
            f"A different PEFT method is already registered as {type_name!r} ({registered.__module__}."
            f"{registered.__qualname__})."
        )
    try:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls)
    except (TypeError, ValueError, KeyError) as exc:
        raise RegistrationError(_peft_note(f"register_peft_method(name={name!r}) failed: {exc}")) from exc
    if PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type) != name + "_":
        raise RegistrationError(_peft_note(f"peft registered {name!r} with an unexpected prefix"))
    del peft


def _same_class(a: Any, b: Any) -> bool:
    return a is b or (
        a is not None and b is not None and (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)
    )


def _peft_note(message: str) -> str:
    import peft

    return (
        f"{message}. safety-peft registers its method the way peft 0.21 expects; the installed peft "
        f"{peft.__version__} seems to need something else. Install peft>=0.21,<0.22 or upgrade safety-peft."
    )
