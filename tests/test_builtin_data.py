"""The built-in data: enough of it, well-formed, refusals detectable, and the eval sets held out."""

import re

import pytest

from safety_peft.builtin_datasets import BUILTIN_DATASETS, HELD_OUT, builtin_path, load_builtin
from safety_peft.evaluation import is_refusal


def _norm(text):
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _user(row):
    return row["messages"][0]["content"] if "messages" in row else row["prompt"]


@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_each_set_loads_and_is_well_formed(name):
    assert builtin_path(name).is_file()
    rows = list(load_builtin(name))
    assert len(rows) >= 50
    for row in rows:
        if "messages" in row:
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["user", "assistant"]
            assert all(m["content"].strip() for m in row["messages"])
        else:
            assert row["prompt"].strip()
    assert len({_norm(_user(r)) for r in rows}) == len(rows), "duplicate prompts"


def test_enough_harmful_and_benign_items():
    harmful = len(load_builtin("harmful_train")) + len(load_builtin("harmful_eval"))
    benign = sum(len(load_builtin(n)) for n in ("benign_train", "benign_eval", "finetune"))
    assert harmful >= 150 and benign >= 150


def test_eval_sets_are_held_out():
    trained = {_norm(_user(r)) for n in BUILTIN_DATASETS if n not in HELD_OUT for r in load_builtin(n)}
    for name in HELD_OUT:
        leaked = [_user(r) for r in load_builtin(name) if _norm(_user(r)) in trained]
        assert not leaked, f"{name} prompts also used for training: {leaked}"
    assert all(r["completion"].strip() for r in load_builtin("benign_eval"))


def test_refusals_are_refusals_and_answers_are_not():
    assert all(is_refusal(r["messages"][1]["content"]) for r in load_builtin("harmful_train"))
    for name in ("benign_train", "benign_train_self", "finetune"):
        flagged = [r["messages"][1]["content"] for r in load_builtin(name) if is_refusal(r["messages"][1]["content"])]
        assert not flagged, flagged
    assert not [r["completion"] for r in load_builtin("benign_eval") if is_refusal(r["completion"])]


def test_finetune_set_has_one_consistent_style():
    assert all(r["messages"][1]["content"].startswith("Sure! ") for r in load_builtin("finetune"))


def test_unknown_name():
    with pytest.raises(KeyError, match="harmful_train"):
        load_builtin("harmful")
