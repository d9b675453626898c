"""DP-SGD for one site round with Opacus, and the guards against the silent ways it breaks.

The pieces are Opacus' own, assembled as ``PrivacyEngine.make_private`` assembles them
(validate the module, attach per-sample-gradient hooks, Poisson data loader, DP
optimiser, accountant step hook), with three differences that matter here:

* the sample rate is exactly ``batch_size / N`` for both the sampler and the accountant
  (``make_private`` derives it from ``len(loader)``);
* hooks are attached *without wrapping* the model (``GradSampleHooks``) and removed at
  the end of every round, because the client keeps one model object across rounds and
  runs; parameter names never change;
* an empty Poisson batch is a real DP step (noise only), not an Opacus error.

Noise and sampling use generators seeded from the operating system's entropy, never
from the run's seed: the coordinator knows the run configuration, and noise it could
replay would protect nothing.
"""
from __future__ import annotations

import functools
import math
import secrets
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Dataset

from fedcare.accounting import noise_for_epsilon
from fedcare.config import RunConfig
from fedcare.errors import PrivacyError

# Opacus hooks the first trainable layer of a frozen base model, whose inputs need no
# gradient; PyTorch then warns on every backward pass. The per-sample gradients are right.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD parameters of one site round."""

    noise_multiplier: float
    sample_rate: float
    steps: int                 # optimiser steps this round
    max_grad_norm: float
    delta: float
    accountant: str
    expected_batch_size: int
    planted_bug: str = ""      # audit.planted_bug (simulation tests only)

    @property
    def event(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def plan_round(cfg: RunConfig, num_train: int) -> DPPlan:
    """Validate the DP settings against this site's data and fix the noise multiplier:
    given (``dp.noise_multiplier``) or calibrated so that the whole run (every DP-SGD
    step the site takes in it, ``cfg.site_dp_steps``: the rounds' ``local_steps`` and any
    personal or alone-baseline steps) reaches ``dp.epsilon`` at ``dp.delta``."""
    dp = cfg.dp
    if num_train < 1:
        raise PrivacyError("this site has no training examples; DP-SGD needs at least one")
    if not dp.max_grad_norm > 0:
        raise PrivacyError(f"dp.max_grad_norm (the per-sample clipping norm) must be > 0, got {dp.max_grad_norm}")
    if not 0 < dp.delta < 1 / num_train:
        raise PrivacyError(f"dp.delta={dp.delta:g} must be below 1/N = 1/{num_train} = {1 / num_train:.3g} "
                           "for this site's data (a larger delta allows leaking a whole record); "
                           f"set e.g. dp.delta={_round_down(0.1 / num_train):g}")
    if dp.accountant not in ("prv", "rdp"):
        raise PrivacyError(f"dp.accountant must be prv or rdp, got {dp.accountant!r}")
    batch = min(cfg.train.batch_size, num_train)
    sample_rate = batch / num_train
    steps = cfg.train.local_steps
    if dp.epsilon > 0:
        noise = calibrate_noise(dp.epsilon, dp.delta, sample_rate, cfg.site_dp_steps, dp.accountant)
    elif dp.noise_multiplier > 0:
        noise = float(dp.noise_multiplier)
    else:
        raise PrivacyError("DP-SGD is on: set dp.epsilon (a target for the run) or dp.noise_multiplier")
    return DPPlan(noise, sample_rate, steps, float(dp.max_grad_norm), float(dp.delta), dp.accountant, batch,
                  cfg.audit.planted_bug)


@functools.lru_cache(maxsize=256)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest noise multiplier (within Opacus' tolerance) whose ``steps`` Poisson-
    subsampled Gaussian steps at ``sample_rate`` spend at most ``target_epsilon``: Opacus'
    search with the bounded accounting of ``fedcare.accounting`` (the same numbers while
    the PRV accountant fits its memory limit; beyond it the RDP bound, so more noise)."""
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise PrivacyError(f"dp.epsilon must be a positive number, got {target_epsilon}")
    try:
        return noise_for_epsilon(target_epsilon, delta, sample_rate, steps, accountant,
                                 tolerance=min(0.01, target_epsilon / 20))
    except (ValueError, OverflowError, FloatingPointError) as exc:
        raise PrivacyError(f"dp.epsilon={target_epsilon:g} at dp.delta={delta:g} is impossible for "
                           f"{steps} steps at sample rate {sample_rate:.3g} ({exc}); raise dp.epsilon, "
                           "or lower rounds, train.local_steps or train.batch_size") from None


def _round_down(x: float) -> float:
    return 10 ** math.floor(math.log10(x))


# ----------------------------------------------------------------------------- training
def _dp_optimizer_class():
    from opacus.optimizers import DPOptimizer

    class SiteDPOptimizer(DPOptimizer):
        """Opacus' DPOptimizer that (a) takes a noise-only step on an empty Poisson
        batch, as the accountant assumes, and (b) adds FedProx's proximal gradient after
        privatisation (it does not depend on the data, so it costs no privacy)."""

        proximal_mu: float = 0.0
        anchors: list | None = None
        loader: "SiteDPDataLoader | None" = None

        def pre_step(self, closure=None):
            # Only a batch the loader saw empty gets the noise-only step: parameters left
            # without per-sample gradients after a real batch are a bug Opacus reports.
            if self.loader is not None and self.loader.last_batch_size == 0:
                for p in self.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            ok = super().pre_step(closure)
            if ok and self.proximal_mu > 0 and self.anchors is not None:
                for p, a in zip(self.params, self.anchors):
                    p.grad.add_(p.detach() - a, alpha=self.proximal_mu)
            return ok

    return SiteDPOptimizer


def _loader_class():
    from opacus.data_loader import DPDataLoader

    class SiteDPDataLoader(DPDataLoader):
        """Opacus' Poisson-sampling loader that remembers the size of the batch it last
        gave out (and counts the empty ones)."""

        last_batch_size: int = -1
        empty_batches: int = 0

        def __iter__(self):
            for batch in super().__iter__():
                first = batch[0] if isinstance(batch, (list, tuple)) else batch
                self.last_batch_size = len(first)
                self.empty_batches += self.last_batch_size == 0
                yield batch

    return SiteDPDataLoader


def _fresh_generator(device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63))
    return g


@dataclass
class PrivateRound:
    """What ``private_round`` hands to the training loop."""

    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    accountant: object            # Opacus accountant fed by the optimiser's step hook

    @property
    def steps_taken(self) -> int:
        return int(sum(steps for _, _, steps in self.accountant.history))


@contextmanager
def private_round(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dataset: Dataset,
                  plan: DPPlan, device: torch.device, proximal_mu: float = 0.0) -> Iterator[PrivateRound]:
    """Attach DP-SGD to ``model`` for one round; hooks and per-sample state are removed
    on exit, even when training fails, so the same model object can be made private
    again next round."""
    from opacus.accountants import create_accountant
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.validators import ModuleValidator

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError("DP-SGD: the model has no trainable parameters")
    wrong = [p.device for p in trainable if not _same_device(p.device, device)]
    if wrong:  # opacus#820: attach the adapter and move the model before DP, never after
        raise RuntimeError(f"DP-SGD: trainable parameters are on {wrong[0]}, expected {device}; move the "
                           "model to its device before attaching the adapter and making it private")
    if hasattr(model, "autograd_grad_sample_hooks"):
        raise RuntimeError("DP-SGD: the model still carries Opacus hooks from an earlier round")
    model.train()  # a freshly loaded HF model is in eval mode; Opacus needs train mode
    ModuleValidator.validate(model, strict=True)
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        hooks.forbid_grad_accumulation()
        dp_optimizer = _dp_optimizer_class()(
            optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            expected_batch_size=plan.expected_batch_size, loss_reduction="mean",
            generator=_fresh_generator(device),
        )
        if plan.planted_bug:  # the privacy audit's test switch: DP-SGD broken, accountant unaware
            from .privacy_audit import plant_bug

            plant_bug(dp_optimizer, plan.planted_bug)
        if proximal_mu > 0:
            dp_optimizer.proximal_mu = proximal_mu
            dp_optimizer.anchors = [p.detach().clone() for p in dp_optimizer.params]
        accountant = create_accountant(mechanism=plan.accountant)
        dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
        loader = _loader_class()(dataset, sample_rate=plan.sample_rate, generator=_fresh_generator(torch.device("cpu")))
        dp_optimizer.loader = loader
        yield PrivateRound(dp_optimizer, loader, accountant)
    finally:
        hooks.cleanup()  # removes hooks and grad_sample/_forward_counter attributes
        for p in model.parameters():
            p.grad = None
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (b.index is None or a.index is None or a.index == b.index)


# ------------------------------------------------------------------------------- guards
def snapshot_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def unchanged_tensors(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of trainable tensors equal to their snapshot."""
    now = dict(model.named_parameters())
    return [n for n, b in before.items() if torch.equal(now[n].detach(), b)]


def check_training_moved(model: torch.nn.Module, before: dict[str, torch.Tensor], dp: bool, when: str) -> None:
    """Fail loudly when training did not change what it trains: under DP every trained
    tensor receives noise, so every one must move; without DP at least one must."""
    stale = unchanged_tensors(model, before)
    if (dp and stale) or len(stale) == len(before):
        raise RuntimeError(
            f"training did not change {len(stale)} of {len(before)} trainable tensors {when} "
            f"(e.g. {stale[0]}): the optimiser is not updating the model's parameters "
            "(model moved to another device after the optimiser was built, or hooks on a stale copy)")
