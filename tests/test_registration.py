"""Registering safety_freeze with PEFT: extending PeftType safely, idempotently, on every supported Python."""

import enum
import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest

REGISTRATION_PY = os.path.join(os.path.dirname(__file__), "..", "safety_peft", "tuners", "registration.py")


def test_add_enum_member_behaves_like_a_declared_member():
    from safety_peft.tuners.registration import add_enum_member

    class Kind(str, enum.Enum):
        A = "A"

    member = add_enum_member(Kind, "NEW_ONE", "NEW_ONE")
    assert Kind("NEW_ONE") is member and Kind.NEW_ONE is member and Kind["NEW_ONE"] is member
    assert [k.name for k in Kind] == ["A", "NEW_ONE"]
    assert "NEW_ONE" in list(Kind) and member == "NEW_ONE"
    assert {member: 1}["NEW_ONE"] == 1  # PEFT looks mappings up with plain strings from JSON
    assert json.dumps({"peft_type": member}) == '{"peft_type": "NEW_ONE"}'
    assert add_enum_member(Kind, "NEW_ONE", "NEW_ONE") is member  # idempotent


def test_add_enum_member_refuses_clashes():
    from safety_peft.tuners.registration import RegistrationError, add_enum_member

    class Kind(str, enum.Enum):
        A = "A"

    with pytest.raises(RegistrationError, match="already exists with value"):
        add_enum_member(Kind, "A", "B")
    with pytest.raises(RegistrationError, match="already belongs to Kind.A"):
        add_enum_member(Kind, "C", "A")


_PROBE = """
import enum, importlib.util, json, pickle, sys
spec = importlib.util.spec_from_file_location("registration", sys.argv[1])
reg = importlib.util.module_from_spec(spec); spec.loader.exec_module(reg)
class Kind(str, enum.Enum):
    A = "A"
m = reg.add_enum_member(Kind, "SAFETY_FREEZE", "SAFETY_FREEZE")
assert Kind("SAFETY_FREEZE") is m and Kind.SAFETY_FREEZE is m and "SAFETY_FREEZE" in list(Kind)
assert {m: 1}["SAFETY_FREEZE"] == 1 and json.dumps(m) == '"SAFETY_FREEZE"' and pickle.loads(pickle.dumps(m)) is m
assert reg.add_enum_member(Kind, "SAFETY_FREEZE", "SAFETY_FREEZE") is m
class Plain(enum.Enum):
    X = 1
p = reg.add_enum_member(Plain, "Y", 2)
assert Plain(2) is p and Plain.Y is p and repr(p) == "<Plain.Y: 2>"
print("ok", sys.version_info[:2])
"""


def _interpreters():
    """Python 3.10-3.13 executables that actually run (pyenv shims of versions not selected do not)."""
    found = {}
    root = os.path.expanduser("~/.pyenv/versions")
    for minor in (10, 11, 12, 13):
        candidates = []
        if os.path.isdir(root):
            candidates += [os.path.join(root, v, "bin", "python") for v in sorted(os.listdir(root)) if v.startswith(f"3.{minor}.")]
        candidates += [shutil.which(f"python3.{minor}")]
        if sys.version_info[:2] == (3, minor):
            candidates.insert(0, sys.executable)
        for path in candidates:
            if path and os.path.exists(path):
                ok = subprocess.run([path, "-c", "pass"], capture_output=True, timeout=30).returncode == 0
                if ok:
                    found[minor] = path
                    break
    return found


@pytest.mark.parametrize("minor", [10, 11, 12, 13])
def test_enum_extension_on_python_3_10_to_3_13(minor):
    """The enum step only needs the standard library, so each interpreter runs it without peft installed."""
    python = _interpreters().get(minor)
    if python is None:
        pytest.skip(f"no Python 3.{minor} interpreter on this machine")
    out = subprocess.run([python, "-c", _PROBE, REGISTRATION_PY], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_import_registers_safety_freeze_with_peft():
    import peft
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    import safety_peft.tuners  # noqa: F401
    from safety_peft.tuners.safety_freeze import SafetyFreezeConfig, SafetyFreezeModel

    kind = peft.PeftType("SAFETY_FREEZE")
    assert PEFT_TYPE_TO_CONFIG_MAPPING[kind] is SafetyFreezeConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[kind] is SafetyFreezeModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[kind] == "safety_freeze_"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SAFETY_FREEZE"] is SafetyFreezeConfig  # as read back from JSON
    assert pickle.loads(pickle.dumps(kind)) is kind


def test_registering_twice_and_reloading_is_harmless():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import safety_peft.tuners.safety_freeze as sf
    from safety_peft.tuners.registration import register_outside_peft_method

    register_outside_peft_method(name="safety_freeze", config_cls=sf.SafetyFreezeConfig, model_cls=sf.SafetyFreezeModel)
    reloaded = importlib.reload(sf)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SAFETY_FREEZE"] is reloaded.SafetyFreezeConfig


def test_another_method_under_the_same_name_is_refused():
    from safety_peft.tuners.registration import RegistrationError, register_outside_peft_method

    class Other:
        pass

    with pytest.raises(RegistrationError, match="different PEFT method is already registered"):
        register_outside_peft_method(name="safety_freeze", config_cls=Other, model_cls=Other)


def test_a_peft_that_changed_fails_with_its_version(monkeypatch):
    import peft
    import peft.utils

    from safety_peft.tuners.registration import RegistrationError, register_outside_peft_method

    def changed(**kwargs):
        raise TypeError("register_peft_method() got an unexpected keyword argument 'config_cls'")

    monkeypatch.setattr(peft.utils, "register_peft_method", changed)

    class Probe:
        pass

    with pytest.raises(RegistrationError, match=f"installed peft {peft.__version__}"):
        register_outside_peft_method(name="safety_freeze_probe", config_cls=Probe, model_cls=Probe)
