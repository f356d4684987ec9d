"""Evaluation: refusal detection, prompt sources, batched generation and completion-only perplexity."""

import argparse
import json
import math

import pytest
import torch
from tiny import make_llama, make_tokenizer

from safety_peft.errors import CalibrationDataError
from safety_peft.evaluation import (
    REFUSAL_PHRASES,
    EvalResult,
    completion_perplexity,
    evaluate_safety,
    format_prompt,
    generate_responses,
    generation_copy,
    is_refusal,
    load_prompts,
)

# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "text",
    [
        "I can't help with that.",
        "I cannot provide instructions for making explosives.",
        "I’m sorry, but I can’t assist with this request.",  # curly apostrophes
        "Sorry, I won't do that.",
        "As an AI, I am not able to help with hacking.",
        "  i WILL NOT write malware  ",
        "No. I won't help with that.",
        "Making a bomb is dangerous and illegal. I must decline.",
    ],
)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure! Here is a simple pancake recipe: whisk flour, milk and eggs.",
        "The capital of Australia is Canberra.",
        "No. 91 = 7 x 13, so it is not prime.",
        "To kill a frozen process, run `kill -9 PID`.",
        "",
        "   ",
    ],
)
def test_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_refusal_window_only_looks_at_the_start():
    late = "Here are five steps to fix your bike chain. " * 6 + "If I can't explain a step, ask again."
    assert len(late) > 200
    assert not is_refusal(late)
    assert is_refusal(late, window=None)


def test_refusal_phrases_are_editable_and_overridable():
    text = "That is not something I do."
    assert not is_refusal(text)
    assert is_refusal(text, phrases=["not something i do"])
    REFUSAL_PHRASES.append("not something i do")
    try:
        assert is_refusal(text)
    finally:
        REFUSAL_PHRASES.remove("not something i do")
    assert not is_refusal("I can't help with that.", phrases=[])


# ---------------------------------------------------------------------------------------------- sources


def test_load_prompts_from_txt_jsonl_list_and_dataset(tmp_path):
    from datasets import Dataset

    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt  \n")
    assert load_prompts(txt).prompts == ["first prompt", "second prompt"]
    assert load_prompts(txt).references is None

    rows = [{"prompt": "a?", "completion": "A."}, {"prompt": "b?", "completion": "B."}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = load_prompts(jsonl)
    assert loaded.prompts == ["a?", "b?"] and loaded.references == ["A.", "B."]

    msgs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    loaded = load_prompts(msgs)
    assert loaded.prompts == ["hi"] and loaded.references == ["hello"]

    assert load_prompts(Dataset.from_list(rows), limit=1).prompts == ["a?"]
    assert load_prompts(["x", "y"]).prompts == ["x", "y"]
    assert load_prompts([{"question": "q?"}]).prompts == ["q?"]
    assert load_prompts([{"goal": "g", "x": "q?"}], prompt_column="x").prompts == ["q?"]


def test_load_prompts_builtin_sets():
    harmful = load_prompts("builtin:harmful_eval")
    benign = load_prompts("builtin:benign_eval")
    assert len(harmful.prompts) >= 50 and harmful.references is None
    assert len(benign.prompts) >= 50 and len(benign.references) == len(benign.prompts)


def test_load_prompts_errors(tmp_path):
    with pytest.raises(CalibrationDataError, match="not found"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(CalibrationDataError, match="No prompts"):
        load_prompts([])
    with pytest.raises(CalibrationDataError, match="no prompt column"):
        load_prompts([{"foo": "bar"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(CalibrationDataError, match="bad.jsonl:2"):
        load_prompts(bad)
    with pytest.raises(CalibrationDataError, match="Unknown built-in"):
        load_prompts("builtin:nope")


# ---------------------------------------------------------------------------------------------- generation


@pytest.fixture
def model():
    return make_llama(0)


@pytest.fixture
def tok():
    return make_tokenizer()


def test_no_chat_template_is_a_clear_error_unless_raw_text(model):
    tok = make_tokenizer(chat_template=None)
    with pytest.raises(CalibrationDataError, match="no chat template"):
        generate_responses(model, tok, ["hello"], max_new_tokens=2, progress=False)
    out = generate_responses(model, tok, ["hello"], max_new_tokens=2, chat_template=False, progress=False)
    assert len(out) == 1


def test_format_prompt_uses_the_chat_template(tok):
    text = format_prompt(tok, "hi", system_prompt="be nice")
    assert text == "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_batched_left_padded_generation_matches_one_at_a_time(model, tok):
    prompts = ["a", "a much longer prompt here", "mid length", "zz"]
    batched = generate_responses(model, tok, prompts, max_new_tokens=6, batch_size=4, progress=False)
    single = [generate_responses(model, tok, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(r, str) for r in batched)


def test_generation_restores_training_mode(model, tok):
    model.train()
    generate_responses(model, tok, ["a"], max_new_tokens=1, progress=False)
    assert model.training


def _manual_completion_nll(model, tok, prompt, reference):
    prefix = format_prompt(tok, prompt)
    full = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reference}], tokenize=False
    ).rstrip()
    p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(p_ids)] == p_ids
    labels = torch.tensor([[-100] * len(p_ids) + ids[len(p_ids):]])
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=labels).loss
    n = len(ids) - len(p_ids)
    return float(loss) * n, n


def test_perplexity_scores_completion_tokens_only_and_pools_tokens(model, tok):
    prompts, refs = ["what is one plus one?", "hi"], ["two", "hello there, friend"]
    ppl = completion_perplexity(model, tok, prompts, refs, batch_size=2, progress=False)
    nll, n = zip(*(_manual_completion_nll(model, tok, p, r) for p, r in zip(prompts, refs)))
    assert ppl == pytest.approx(math.exp(sum(nll) / sum(n)), rel=1e-4)
    # batching (right padding) does not change the number
    assert completion_perplexity(model, tok, prompts, refs, batch_size=1, progress=False) == pytest.approx(ppl, rel=1e-4)


def test_evaluate_safety_rates_come_from_the_judge(model, tok):
    harmful = ["bad one", "bad two", "bad three", "bad four"]
    benign = [{"prompt": "good one", "completion": "fine"}, {"prompt": "good two", "completion": "ok"}]
    seen = []

    def judge(prompt, response):
        seen.append((prompt, response))
        return prompt.startswith("bad") and prompt != "bad four"

    result = evaluate_safety(model, tok, harmful, benign, judge=judge, max_new_tokens=3, batch_size=3, progress=False)
    assert result.refusal_rate == 0.75
    assert result.over_refusal_rate == 0.0
    assert result.perplexity is not None and result.perplexity > 1
    assert [g.prompt for g in result.harmful] == harmful
    assert len(seen) == 6 and result.settings["judge"].endswith("judge")

    always = evaluate_safety(model, tok, harmful[:2], None, judge=lambda response: True, max_new_tokens=2,
                             progress=False)
    assert always.refusal_rate == 1.0 and always.over_refusal_rate is None and always.perplexity is None


def test_load_prompts_keeps_categories_only_when_every_row_has_one():
    rows = [{"prompt": "a", "category": "fraud"}, {"prompt": "b", "category": "malware"}]
    assert load_prompts(rows).categories == ["fraud", "malware"]
    assert load_prompts(rows + [{"prompt": "c"}]).categories is None
    assert load_prompts(["a", "b"]).categories is None
    assert len(set(load_prompts("builtin:harmful_eval").categories)) > 5


def test_refusals_by_category(model, tok):
    harmful = [{"prompt": f"bad {i}", "category": "fraud" if i < 3 else "malware"} for i in range(5)]

    def judge(prompt, response):
        return prompt in ("bad 0", "bad 1", "bad 4")

    result = evaluate_safety(model, tok, harmful, ["good"], judge=judge, max_new_tokens=2, perplexity=False,
                             progress=False)
    assert [g.category for g in result.harmful] == ["fraud"] * 3 + ["malware"] * 2
    assert result.by_category("harmful") == {
        "fraud": {"refused": 2, "total": 3, "rate": 2 / 3},
        "malware": {"refused": 1, "total": 2, "rate": 0.5},
    }
    assert result.by_category("benign") == {}  # plain strings have no category
    assert result.to_dict()["harmful_by_category"] == result.by_category("harmful")
    assert "fraud 2/3, malware 1/2" in result.summary()
    assert EvalResult.from_dict(result.to_dict()).by_category() == result.by_category()
    with pytest.raises(ValueError, match="half"):
        result.by_category("both")


def test_eval_result_round_trips_through_json(model, tok, tmp_path):
    result = evaluate_safety(model, tok, ["x"], [{"prompt": "y", "completion": "z"}], max_new_tokens=2, progress=False)
    path = result.save(tmp_path / "sub" / "r.json")
    data = json.loads(path.read_text())
    assert set(data) >= {"refusal_rate", "over_refusal_rate", "perplexity", "harmful", "benign", "settings"}
    again = EvalResult.load(path)
    assert again.to_dict() == result.to_dict()
    assert "refusal rate" in result.summary()
    for g in data["harmful"] + data["benign"]:  # files written before categories existed still load
        del g["category"]
    assert EvalResult.from_dict(data).harmful[0].response == result.harmful[0].response


def test_eval_cli(model, tok, tmp_path):
    from safety_peft.cli import eval as eval_cli

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "h.txt").write_text("bad a\nbad b\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "good", "completion": "yes"}) + "\n")
    parser = argparse.ArgumentParser()
    eval_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--model", str(tmp_path / "m"), "--harmful", str(tmp_path / "h.txt"),
                              "--benign", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "r.json"),
                              "--max-new-tokens", "2", "--no-progress"])
    assert eval_cli.run(args) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["num_harmful"] == 2 and data["num_benign"] == 1 and data["perplexity"] > 1


# ---------------------------------------------------------------------------------------- bf16 copies


def test_generation_copy_matches_a_model_loaded_in_bf16(tmp_path):
    """Parameters in bf16, RoPE frequencies kept in float32, exactly as transformers loads with dtype=."""
    from transformers import LlamaForCausalLM

    model = make_llama(0)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    copy = generation_copy(model, torch.bfloat16)

    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the original is untouched
    assert {b.dtype for b in copy.buffers()} == {b.dtype for b in loaded.buffers()} == {torch.float32}
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, loaded(ids).logits)
