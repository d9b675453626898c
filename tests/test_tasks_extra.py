"""The issue-6 tasks: breastmnist (EfficientNet-Lite0 + conv LoRA) and medical-llm
(SmolLM2-135M + LoRA), on small real subsets, plain and under Opacus."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, DataError
from fedcare.models.base import Task
from fedcare.models.registry import get_task
from fedcare.models.state import get_trainable_state, set_trainable_state, state_nbytes
from fedcare.models.training import make_optimizer, make_train_loader, predict_dataset, train_steps

CPU = torch.device("cpu")


def small_cfg(task: Task, **flat) -> RunConfig:
    cfg = RunConfig()
    cfg.update(task.settings("lora"))
    cfg.update({"data.max_train_per_site": 8, "data.max_test_per_site": 6, "train.batch_size": 4, **flat})
    return cfg.validate()


def changed(before: dict, after: dict) -> list[str]:
    return [k for k in before if not np.array_equal(before[k], after[k])]


# ------------------------------------------------------------------------ EfficientNet-Lite0
def test_lite0_loads_imagenet_weights_and_matches_their_statistics():
    """Every pretrained tensor loads (strict), and on real images the pre-normalisation
    activations of the deepest blocks follow the stored BN statistics: wiring, strides and
    padding are right (a random network of the same shape does not)."""
    from fedcare.models.efficientnet_lite import EfficientNetLite0, FrozenBatchNorm, pretrained_lite0

    images = np.load(__import__("fedcare.models.data", fromlist=["x"]).bundled_dir("breastmnist") / "breastmnist.npz")
    x = torch.tensor(images["train_images"][:32], dtype=torch.float32)[:, None] / 255
    x = torch.nn.functional.interpolate(x, size=64, mode="bilinear").repeat(1, 3, 1, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def project_bn_correlation(model):
        stats = {}
        for name, mod in model.named_modules():
            if isinstance(mod, FrozenBatchNorm) and name.endswith("_bn2"):
                mod.register_forward_hook(lambda m, i, o, n=name: stats.__setitem__(n, (i[0].mean((0, 2, 3)), m.running_mean)))
        with torch.no_grad():
            model.eval()(x)
        return np.mean([np.corrcoef(a.numpy(), b.numpy())[0, 1] for a, b in list(stats.values())[8:]])

    assert project_bn_correlation(pretrained_lite0()) > 0.85
    scrambled = EfficientNetLite0()
    state = pretrained_lite0().state_dict()
    scrambled.load_state_dict({k: (v[torch.randperm(v.shape[0])] if "conv" in k else v) for k, v in state.items()})
    assert project_bn_correlation(scrambled) < 0.5


# ------------------------------------------------------------------------ breastmnist
@pytest.fixture(scope="module")
def breast() -> Task:
    return get_task("breastmnist")


def test_breastmnist_sites_use_official_splits(breast):
    cfg = RunConfig()
    cfg.update(breast.settings("lora"))
    splits = [breast.load_site(s, cfg) for s in breast.site_ids(cfg)]
    assert sum(len(s.train) for s in splits) == 546 and sum(len(s.test) for s in splits) == 156
    assert all(len(s.test) >= 4 for s in splits)
    x, y = splits[0].train.tensors
    assert x.shape[1:] == (1, 28, 28) and 0 <= x.min() and x.max() <= 1 and set(y.tolist()) <= {0, 1}
    labels = torch.cat([s.train.tensors[1] for s in splits])
    assert int((labels == 0).sum()) == 147  # malignant in the official train split


def test_breastmnist_lora_on_convs_trains(breast):
    cfg = small_cfg(breast)
    model = breast.build_model(cfg)
    state = get_trainable_state(model)
    total = sum(p.numel() for p in model.parameters())
    assert state_nbytes(state) < 0.1 * total * 4
    assert any("_project_conv.lora_A" in k for k in state) and any("_fc" in k for k in state)
    assert all("lora_" in k or "_fc" in k for k in state)
    lora_conv = next(m for n, m in model.named_modules() if n.endswith("_blocks.3._expand_conv"))
    assert isinstance(lora_conv.lora_A["default"], torch.nn.Conv2d)

    split = breast.load_site("site-1", cfg)
    frozen = model.base_model.model.backbone._conv_stem.weight.detach().clone()
    result = train_steps(breast, model, make_optimizer(model, cfg), make_train_loader(split.train, cfg, 0), 2, CPU)
    assert np.isfinite(result.train_loss)
    after = get_trainable_state(model)
    moved = changed(state, after)
    assert any("lora_B" in k for k in moved) and any("_fc" in k for k in moved)
    assert torch.equal(frozen, model.base_model.model.backbone._conv_stem.weight)

    scores, labels = predict_dataset(breast, model, split.test, cfg, CPU)
    assert scores.shape == (len(split.test), 2)
    assert {"accuracy", "balanced_accuracy"} <= set(breast.metrics(scores, labels))
    fresh = breast.build_model(cfg)
    assert not changed(state, get_trainable_state(fresh))  # same seed, same start
    set_trainable_state(fresh, after)
    assert np.allclose(predict_dataset(breast, fresh, split.test, cfg, CPU)[0], scores, atol=1e-5)


def test_breastmnist_trains_under_opacus(breast):
    from opacus import PrivacyEngine

    cfg = small_cfg(breast, **{"lora.aggregation": "ffa"})
    model = breast.build_model(cfg)
    assert not any("lora_A" in k for k in get_trainable_state(model))
    split = breast.load_site("site-2", cfg)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=make_optimizer(model, cfg), data_loader=make_train_loader(split.train, cfg, 0),
        noise_multiplier=1.0, max_grad_norm=1.0)
    before = get_trainable_state(private)
    train_steps(breast, private, optimizer, loader, 2, CPU)
    assert len(changed(before, get_trainable_state(private))) == len(before)
    assert engine.get_epsilon(1e-5) > 0


def test_breastmnist_bad_inputs(breast, tmp_path):
    with pytest.raises(ConfigError, match="target_modules"):
        breast.build_model(small_cfg(breast, **{"lora.target_modules": "query"}))
    np.savez(tmp_path / "x.npz", train_images=np.zeros((4, 32, 32), np.uint8), train_labels=np.zeros(4),
             test_images=np.zeros((4, 28, 28), np.uint8), test_labels=np.zeros(4))
    with pytest.raises(DataError, match="x.npz: train_images must be"):
        breast.load_site("site-0", small_cfg(breast, **{"data.path": str(tmp_path)}))


# ------------------------------------------------------------------------ medical-llm
@pytest.fixture(scope="module")
def llm():
    # short prompts keep the CPU test fast (the module default is 64 abstract tokens)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fedcare.models.medical_llm.ABSTRACT_TOKENS", 16)
        yield get_task("medical-llm")


def test_llm_prompts_and_answer_only_loss(llm):
    from fedcare.models.medical_llm import model_source, tokenizer

    cfg = small_cfg(llm, **{"data.max_train_per_site": 4, "data.max_test_per_site": 2, "train.batch_size": 2})
    split = llm.load_site("site-0", cfg)
    prompt, pmask, answers, amask, y = split.train.tensors
    tok = tokenizer(model_source(cfg))
    assert prompt.shape[0] == 4 and (pmask[:, -1] == 1).all()  # left-padded: prompts end together
    text = tok.decode(prompt[0][pmask[0] == 1])
    assert "Abstract:" in text and "neoplasms" in text
    names = ["neoplasms", "digestive system diseases", "nervous system diseases", "cardiovascular diseases",
             "general pathological conditions"]
    assert [tok.decode(a[m == 1], skip_special_tokens=True) for a, m in zip(answers, amask)] == [names[k] for k in y]

    model = llm.build_model(cfg)
    state = get_trainable_state(model)
    assert state and all("lora_" in k and ("q_proj" in k or "v_proj" in k) for k in state)
    total = sum(p.numel() for p in model.parameters())
    assert state_nbytes(state) < 0.01 * total * 4

    # the loss depends on answer tokens only: changing the prompt's padding side tokens does not matter,
    # changing an answer token does
    model.eval()
    batch = tuple(t[:2] for t in split.train.tensors)
    with torch.no_grad():
        base = llm.batch_loss(model, batch)
        other = list(batch)
        other[2] = answers[:2].roll(1, 0)
        other[3] = amask[:2].roll(1, 0)
        assert not torch.isclose(base, llm.batch_loss(model, tuple(other)))
    model.train()

    before = get_trainable_state(model)
    result = train_steps(llm, model, make_optimizer(model, cfg), make_train_loader(split.train, cfg, 0), 1, CPU)
    assert np.isfinite(result.train_loss)
    assert any("lora_B" in k for k in changed(before, get_trainable_state(model)))

    scores, labels = predict_dataset(llm, model, split.test, cfg, CPU)
    assert scores.shape == (2, 5) and np.allclose(scores.sum(1), 1)
    metrics = llm.metrics(scores, labels)
    assert 0 <= metrics["exact_match"] <= 1 and metrics["answer_perplexity"] > 1
    assert "accuracy" in metrics


def test_llm_unknown_base_model(llm, tmp_path):
    with pytest.raises(ConfigError, match="base_model"):
        llm.build_model(small_cfg(llm, **{"lora.base_model": str(tmp_path / "none")}))


# ------------------------------------------------------------------------ end to end, DP on
def _e2e(tmp_path, task: str, *sets: str) -> dict:
    from e2e import simulate  # tests/ is on sys.path (rootdir conftest)

    db = f"sqlite:///{tmp_path}/fed.db"
    args = ["--task", task, "--sites", "2", "--rounds", "2", "--set", "dp.noise_multiplier=0.8",
            "--set", "dp.max_grad_norm=1.0", "--set", "strategy.min_sites=2"]
    for s in sets:
        args += ["--set", s]
    _, rep = simulate(db, *args, timeout=1800)
    assert rep["status"] == "completed" and len(rep["rounds"]) == 2
    for r in rep["rounds"]:
        assert len(r["sites"]) == 2 and all(s["accepted"] and s["update_bytes"] > 0 for s in r["sites"])
    return rep


@pytest.mark.e2e
def test_breastmnist_two_rounds_with_dp(tmp_path):
    rep = _e2e(tmp_path, "breastmnist", "train.mode=lora", "data.max_train_per_site=16", "data.max_test_per_site=8",
               "train.local_steps=2", "train.batch_size=4")
    assert {"accuracy", "balanced_accuracy"} <= set(rep["final"]["metrics"])
    assert set(rep["final"]["per_site"]) == {"site-0", "site-1"}


@pytest.mark.e2e
def test_medical_llm_two_rounds_with_dp(tmp_path):
    rep = _e2e(tmp_path, "medical-llm", "data.max_train_per_site=4", "data.max_test_per_site=2",
               "train.local_steps=1", "train.batch_size=2", "train.eval_batch_size=2")
    final = rep["final"]["metrics"]
    assert {"accuracy", "exact_match", "answer_perplexity"} <= set(final) and final["answer_perplexity"] > 1
