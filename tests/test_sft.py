"""The demo's padding-free SFT: same loss and gradients as padded batches, truncation, and the lock under it."""

import pytest
import torch
from _tuner_utils import lock_stats, random_masks
from datasets import Dataset
from tiny import chat_rows, make_llama, make_tokenizer
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import safety_peft.tuners  # noqa: F401
from safety_peft.sft import cpu_friendly_sft_trainer, truncate_tokenized
from safety_peft.tuners.safety_freeze import SafetyFreezeConfig


def _trainer(tmp_path, model=None, rows=None, **kw):
    kw.setdefault("max_length", 512)
    kw.setdefault("bf16", False)  # exact float32 comparisons unless a test asks for autocast
    return cpu_friendly_sft_trainer(
        model or make_llama(0), make_tokenizer(), rows or chat_rows(8), output_dir=str(tmp_path), progress=False,
        per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, seed=0, **kw,
    )


def _loss_and_grads(model, batch):
    model.zero_grad()
    keys = ("input_ids", "attention_mask", "position_ids", "labels")
    loss = model(use_cache=False, **{k: v for k, v in batch.items() if k in keys}).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_padding_free_batch_matches_padded_batch(tmp_path):
    trainer = _trainer(tmp_path)
    model = trainer.model.train()
    features = [trainer.train_dataset[i] for i in range(4)]
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) > 1  # otherwise there is no padding to remove

    packed = trainer.data_collator(features)
    assert packed["input_ids"].shape == (1, sum(lengths))  # not one padding token
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(features)
    assert padded["input_ids"].shape == (4, max(lengths))

    loss_packed, grads_packed = _loss_and_grads(model, packed)
    loss_padded, grads_padded = _loss_and_grads(model, padded)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    assert (grads_packed - grads_padded).norm() <= 1e-4 * grads_padded.norm()


def test_plain_loss_equals_trls_fused_loss(tmp_path):
    """PlainLossSFTTrainer's loss (the model's own) is TRL's completion-token mean, here in float32."""
    trainer = _trainer(tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.train()
    ours = trainer.compute_loss(model, dict(batch))
    trls = SFTTrainer.compute_loss(trainer, model, dict(batch))
    torch.testing.assert_close(ours, trls, rtol=1e-5, atol=1e-6)
    labels = batch["labels"][0, 1:]
    logits = model(use_cache=False, input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, :-1]
    by_hand = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-6)


def test_without_the_block_mask_the_rows_would_leak(tmp_path):
    """Guards the test above: attending across rows (a cache disables the packed mask) changes the loss."""
    trainer = _trainer(tmp_path)
    model = trainer.model.train()
    packed = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ids = {k: packed[k] for k in ("input_ids", "labels")}
    leaky = model(**ids, position_ids=torch.arange(ids["input_ids"].shape[1])[None]).loss
    exact = model(use_cache=False, **ids, position_ids=packed["position_ids"]).loss
    assert not torch.allclose(leaky, exact)


def test_rows_longer_than_max_length_are_cut(tmp_path):
    trainer = _trainer(tmp_path, max_length=20)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert max(lengths) == 20
    assert "labels" in trainer.train_dataset.column_names  # per-token labels are cut with the ids
    for row in trainer.train_dataset:
        assert len(row["labels"]) == len(row["input_ids"])
    trainer.train()  # and training runs on the cut rows


def test_truncate_tokenized_keeps_short_rows_and_other_columns():
    data = Dataset.from_list([
        {"input_ids": [1, 2, 3, 4], "completion_mask": [0, 0, 1, 1], "source": ["a", "b"]},
        {"input_ids": [5, 6], "completion_mask": [0, 1], "source": ["c", "d"]},
    ])
    cut = truncate_tokenized(data, 3)
    assert cut["input_ids"] == [[1, 2, 3], [5, 6]]
    assert cut["completion_mask"] == [[0, 0, 1], [0, 1]]
    assert cut["source"] == [["a", "b"], ["c", "d"]]
    assert truncate_tokenized(data, 4) is data
    with pytest.raises(ValueError, match="max_length"):
        truncate_tokenized(data, 0)


def test_no_rows_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="No training rows"):
        cpu_friendly_sft_trainer(make_llama(0), make_tokenizer(), [], output_dir=str(tmp_path), max_length=64)


def test_lock_is_exact_in_padding_free_training(tmp_path):
    model = make_llama(0)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = random_masks(model, density=0.3)
    trainer = _trainer(tmp_path, model=model, rows=chat_rows(16), peft_config=SafetyFreezeConfig(masks=masks),
                       bf16=True, weight_decay=0.1)
    trainer.train()
    merged = trainer.model.merge_and_unload()
    broken, changed_fraction = lock_stats(merged, reference, masks)
    assert broken == 0
    assert changed_fraction > 0.5
