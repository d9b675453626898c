"""The two foundation tasks against the Task contract: real data, real models, one
real training step each."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.models.base import Task
from fedcare.models.registry import get_task, task_names
from fedcare.models.state import get_trainable_state, set_trainable_state, state_nbytes
from fedcare.models.training import make_optimizer, make_train_loader, predict_dataset, train_steps

CPU = torch.device("cpu")


def small_cfg(task: Task, **flat) -> RunConfig:
    cfg = RunConfig()
    cfg.update(task.settings("lora"))
    cfg.update({"data.max_train_per_site": 16, "data.max_test_per_site": 8, **flat})
    return cfg.validate()


@pytest.fixture(scope="module")
def abstracts() -> Task:
    return get_task("medical-abstracts")


def test_registry_names():
    assert {"heart-disease", "medical-abstracts"} <= set(task_names())
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("nope")


def test_heart_disease_contract():
    task = get_task("heart-disease")
    cfg = small_cfg(task)
    assert task.site_ids(cfg) == ["cleveland", "hungary", "switzerland", "va"]
    assert not task.uses_lora and task.sensitive_attributes == ("sex", "age_band")
    model = task.build_model(cfg)
    assert all(p.requires_grad for p in model.parameters())
    split = task.load_site("switzerland", cfg)
    before = get_trainable_state(model)
    result = train_steps(task, model, make_optimizer(model, cfg), make_train_loader(split.train, cfg, 1), 5, CPU)
    assert result.steps == 5 and np.isfinite(result.train_loss) and result.num_examples == 30
    after = get_trainable_state(model)
    assert any(not np.allclose(before[k], after[k]) for k in before)


def test_abstract_sites_have_train_and_test(abstracts):
    cfg = small_cfg(abstracts, sites=5, **{"data.dirichlet_alpha": 0.1})
    for site in abstracts.site_ids(cfg):
        split = abstracts.load_site(site, cfg)
        ids, mask, y = split.train.tensors
        assert ids.shape == (len(split.train), 128) and mask.dtype == torch.long
        assert 0 < len(split.train) <= 16 and 0 < len(split.test) <= 8
        assert split.groups == {} and set(y.tolist()) <= set(range(5))
    again = [abstracts.load_site(s, cfg) for s in abstracts.site_ids(cfg)]
    assert torch.equal(again[0].train.tensors[0], abstracts.load_site("site-0", cfg).train.tensors[0])


def test_abstract_lora_model(abstracts):
    cfg = small_cfg(abstracts)
    model = abstracts.build_model(cfg)
    assert model.training
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.02 * total
    names = list(get_trainable_state(model))
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any("classifier" in n for n in names)
    assert all("lora" in n or "classifier" in n for n in names)
    assert state_nbytes(get_trainable_state(model)) < 0.01 * total * 4

    # the same seed builds the same initial state; another seed does not
    same = get_trainable_state(abstracts.build_model(cfg))
    first = get_trainable_state(model)
    assert all(np.array_equal(first[k], same[k]) for k in first)
    cfg.seed = 7
    other = get_trainable_state(abstracts.build_model(cfg))
    assert any(not np.array_equal(first[k], other[k]) for k in first)


def test_abstract_ffa_freezes_a(abstracts):
    cfg = small_cfg(abstracts, **{"lora.aggregation": "ffa", "lora.r": 4})
    model = abstracts.build_model(cfg)
    names = list(get_trainable_state(model))
    assert not any("lora_A" in n for n in names)
    assert any("lora_B" in n for n in names) and any("classifier" in n for n in names)
    assert any("lora_A" in n and not p.requires_grad for n, p in model.named_parameters())


def test_abstract_train_step_and_predict(abstracts):
    cfg = small_cfg(abstracts, **{"train.batch_size": 4})
    model = abstracts.build_model(cfg)
    split = abstracts.load_site("site-1", cfg)
    before = get_trainable_state(model)
    frozen_before = model.base_model.model.encoder.embeddings.word_embeddings.weight.detach().clone()
    result = train_steps(abstracts, model, make_optimizer(model, cfg), make_train_loader(split.train, cfg, 0), 2, CPU)
    assert np.isfinite(result.train_loss)
    after = get_trainable_state(model)
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert any("lora_B" in k for k in changed) and any("classifier" in k for k in changed)
    assert torch.equal(frozen_before, model.base_model.model.encoder.embeddings.word_embeddings.weight)

    scores, labels = predict_dataset(abstracts, model, split.test, cfg, CPU)
    assert scores.shape == (len(split.test), 5) and np.allclose(scores.sum(1), 1, atol=1e-5)
    assert set(abstracts.metrics(scores, labels)) >= {"accuracy", "macro_f1", "loss"}

    # the state travels: a fresh build takes it and predicts the same
    fresh = abstracts.build_model(cfg)
    set_trainable_state(fresh, after)
    again, _ = predict_dataset(abstracts, fresh, split.test, cfg, CPU)
    assert np.allclose(scores, again, atol=1e-5)


def test_abstract_bad_target_modules(abstracts):
    with pytest.raises(ConfigError, match="target_modules"):
        abstracts.build_model(small_cfg(abstracts, **{"lora.target_modules": "q_proj"}))
