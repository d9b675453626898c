"""train.mode: the frozen-encoder head mode (mean-pooled embeddings, cached once per
process), LoRA with its own head learning rate, and full fine-tuning, on the real
MiniLM encoder and a few real abstracts."""
import numpy as np
import pytest
import torch

from fedcare.client.ledger import SiteLedger
from fedcare.client.training import train_on_site
from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.models import medical_abstracts as ma
from fedcare.models.state import get_trainable_state
from fedcare.models.training import evaluate_global, make_optimizer, make_train_loader, train_steps

CPU = torch.device("cpu")
TASK = ma.MedicalAbstractsTask()


def cfg_of(**sets) -> RunConfig:
    flat = {**TASK.settings("lora"), "task": TASK.name, "data.max_train_per_site": 8, "data.max_test_per_site": 4,
            "train.batch_size": 4, "lora.target_modules": "query"}
    return RunConfig.from_flat({**flat, **sets}).validate()


def test_head_mode_trains_only_the_head_over_cached_embeddings():
    cfg = cfg_of(**{"train.mode": "head", "train.lr": 0.05})
    model = TASK.build_model(cfg)
    assert sorted(get_trainable_state(model)) == ["classifier.bias", "classifier.weight"]
    split = TASK.load_site("site-0", cfg)
    encoder_before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    calls = []
    hook = model.encoder.register_forward_hook(lambda m, i, o: calls.append(i))
    ids, mask, _ = split.train.tensors
    first = model.embed(ids, mask)
    n_calls = len(calls)
    # the cache answers every later request for the same abstracts, from any model object
    again = TASK.build_model(cfg)
    again.encoder.register_forward_hook(lambda m, i, o: calls.append(i))
    assert torch.equal(again.embed(ids, mask), first) and len(calls) == n_calls
    # the embedding is the attention-masked mean of the token states, not CLS
    with torch.no_grad():
        h = model.encoder(input_ids=ids[:2], attention_mask=mask[:2]).last_hidden_state
    m = mask[:2].unsqueeze(-1).float()
    assert torch.allclose(first[:2], (h * m).sum(1) / m.sum(1), atol=1e-5)
    hook.remove()

    before = get_trainable_state(model)
    result = train_steps(TASK, model, make_optimizer(model, cfg), make_train_loader(split.train, cfg, 0), 5, CPU)
    after = get_trainable_state(model)
    assert np.isfinite(result.train_loss) and all(not np.array_equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, encoder_before[n]) for n, p in model.encoder.named_parameters())
    assert not model.encoder.training and model.classifier.training  # no dropout in the frozen encoder


def test_head_mode_under_dp_sgd_moves_the_head_and_charges_the_ledger(tmp_path):
    cfg = cfg_of(**{"train.mode": "head", "rounds": 2, "train.local_steps": 3, "dp.noise_multiplier": 1.0,
                    "dp.delta": 1e-3})
    model = TASK.build_model(cfg)
    split = TASK.load_site("site-1", cfg)
    out = _dp_rounds_move_every_trained_key(TASK, model, split, cfg, tmp_path, "site-1")
    assert out.privacy["steps"] == 6 and np.isfinite(out.privacy["epsilon"]) and out.privacy["epsilon"] > 0
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_lora_mode_head_lr_and_full_mode():
    cfg = cfg_of(**{"train.lr": 1e-3, "train.head_lr": 1e-2})
    model = TASK.build_model(cfg)
    names = list(get_trainable_state(model))
    assert any("lora_B" in n for n in names) and any("classifier" in n for n in names)
    groups = make_optimizer(model, cfg).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    lora = {id(p) for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert {id(p) for p in groups[0]["params"]} == lora
    assert len(make_optimizer(model, cfg_of()).param_groups) == 1  # head_lr 0: one learning rate

    full = TASK.build_model(cfg_of(**{"train.mode": "full"}))
    assert all(p.requires_grad for p in full.parameters())
    assert not any("lora" in n for n, _ in full.named_parameters())


@pytest.mark.parametrize("sets", [{"lora.aggregation": "ffa"}, {"lora.site_ranks": "4,8"},
                                  {"lora.personalize": "head"}])
def test_modes_without_an_adapter_refuse_lora_settings(sets):
    with pytest.raises(ConfigError, match="train.mode=head trains no LoRA adapter"):
        cfg_of(**{"train.mode": "head", **sets})
    with pytest.raises(ConfigError, match="train.mode must be"):
        cfg_of(**{"train.mode": "probe"})


def test_evaluate_global_before_and_after_training():
    cfg = cfg_of(**{"train.mode": "head", "sites": 2})
    before, n = evaluate_global(TASK, cfg, None)
    assert n == 8 and 0 <= before["accuracy"] <= 1
    state = get_trainable_state(TASK.build_model(cfg))
    state["classifier.bias"] = np.array([0, 0, 9, 0, 0], dtype=np.float32)   # always class 2
    state["classifier.weight"][:] = 0
    after, _ = evaluate_global(TASK, cfg, state)
    labels = np.concatenate([TASK.load_site(s, cfg).test.tensors[2].numpy() for s in TASK.site_ids(cfg)])
    assert after["accuracy"] == pytest.approx(float((labels == 2).mean()))


# ------------------------------------------------------------------------ breastmnist
def breast_cfg(**sets) -> RunConfig:
    from fedcare.models.registry import get_task

    flat = {**get_task("breastmnist").settings("head"), "task": "breastmnist", "data.max_train_per_site": 8,
            "data.max_test_per_site": 4, "train.batch_size": 4, "train.mode": "head"}
    return RunConfig.from_flat({**flat, **sets}).validate()


def test_breastmnist_head_mode_trains_only_the_head_on_cached_features_and_under_dp(tmp_path):
    """Head mode on the image preset (and the image family, which builds the same model):
    only ``_fc`` trains and leaves the site; each image's frozen features are computed
    once; a DP-SGD round moves the head and leaves the backbone and no Opacus state."""
    from fedcare.models import breastmnist as bm
    from fedcare.models.families import ImageTask
    from fedcare.models.registry import get_task

    task = get_task("breastmnist")
    cfg = breast_cfg(**{"rounds": 2, "train.local_steps": 2, "dp.noise_multiplier": 1.0, "dp.delta": 1e-3})
    model = task.build_model(cfg)
    head = ["backbone._fc.bias", "backbone._fc.weight"]
    assert sorted(get_trainable_state(model)) == head and model.image_size == bm.HEAD_IMAGE_SIZE
    family = ImageTask().build_model(breast_cfg(**{"data.labels": "a,b,c"}))
    assert sorted(get_trainable_state(family)) == head and family.backbone._fc.out_features == 3

    split = task.load_site("site-0", cfg)
    x = split.train.tensors[0]
    calls = []
    hook = model.backbone._conv_stem.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    first = model.features(x)
    again = task.build_model(cfg)   # the cache answers any model object of the same run shape
    again.backbone._conv_stem.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    assert torch.equal(again.features(x), first) and sum(calls) <= len(x)
    full = task.build_model(breast_cfg(**{"train.mode": "full"}))
    full.image_size = bm.HEAD_IMAGE_SIZE
    with torch.no_grad():   # the cached features are the backbone's, and the logits the same function
        assert torch.allclose(full.features(x), first, atol=1e-4)
        assert torch.allclose(full.eval()(x), model.eval()(x), atol=1e-4)
    hook.remove()

    backbone = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if "_fc" not in n}
    out = _dp_rounds_move_every_trained_key(task, model, split, cfg, tmp_path, "site-0")
    assert sorted(get_trainable_state(model)) == head
    assert out.privacy["steps"] == 4 and np.isfinite(out.privacy["epsilon"]) and out.privacy["epsilon"] > 0
    assert all(torch.equal(p, backbone[n]) for n, p in model.backbone.named_parameters() if "_fc" not in n)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert sum(calls) <= len(x)   # DP-SGD trained on the cached features: no backbone pass


def _dp_rounds_move_every_trained_key(task, model, split, cfg, tmp_path, site: str):
    """Two rounds of site training with the ledger; every trainable tensor moves in each.
    Returns the last round's outcome."""
    ledger = SiteLedger(tmp_path / "l.sqlite")
    for rnd in (1, 2):
        before = get_trainable_state(model)
        out = train_on_site(task, model, split, cfg, CPU, run_id="r", server_round=rnd, ledger=ledger,
                            budget=0.0, dataset_id=site)
        after = get_trainable_state(model)
        assert all(not np.array_equal(before[k], after[k]) for k in before)
    return out
