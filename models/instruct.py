"""Instruction tuning (causal LM + LoRA, medical-llm's model): a site's JSONL/CSV/Parquet
of prompt/response pairs, or chat ``messages`` (the last assistant turn is the response).

The run's contract fixes the prompt template (``data.prompt_template``, with
``{prompt}``) and the prompt length in tokens (``data.text_length``). Loss is on the
response tokens only (medical-llm's ``batch_loss``); evaluation reports the response
perplexity and exact match of the greedy generation. Rows are tokenised when asked for.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset

from fedcare.config import RunConfig
from fedcare.errors import DataError

from .base import SiteSplit
from .medical_llm import MedicalLlmTask, SYSTEM, _forward_answers, end_token, model_source, normalise_answer, tokenizer
from .sitedata import Contract, Description, columns_for, finish, read_table

RESPONSE_TOKENS = 32     # response + end token, right-padded (longer responses are cut)
PROMPT_TOKENS = 192      # default prompt length (data.text_length overrides it)


def _chat(tok, turns: list[dict]) -> str:
    if tok.chat_template:
        return tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(f"{t['role']}: {t['content']}" for t in turns) + "\nassistant: "


class InstructRows(Dataset):
    """(prompt ids, prompt mask) left-padded, (response ids, mask) right-padded, 0."""

    def __init__(self, prompts: list, responses: np.ndarray, source: str, width: int, template: str) -> None:
        self.prompts, self.responses, self.source, self.width, self.template = prompts, responses, source, width, template

    def __len__(self) -> int:
        return len(self.responses)

    def __getitem__(self, i: int):
        tok = tokenizer(self.source)
        turns = self.prompts[i]
        if isinstance(turns, str):
            turns = [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": self.template.format(prompt=turns)}]
        row = tok(_chat(tok, turns), add_special_tokens=False)["input_ids"][-self.width:]
        ids = torch.full((self.width,), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(self.width, dtype=torch.long)
        ids[self.width - len(row):], mask[self.width - len(row):] = torch.tensor(row), 1
        ans = (tok(str(self.responses[i]), add_special_tokens=False)["input_ids"] + [end_token(tok)])[:RESPONSE_TOKENS]
        aids = torch.full((RESPONSE_TOKENS,), tok.pad_token_id, dtype=torch.long)
        amask = torch.zeros(RESPONSE_TOKENS, dtype=torch.long)
        aids[:len(ans)], amask[:len(ans)] = torch.tensor(ans), 1
        return ids, mask, aids, amask, torch.tensor(0)


def read_pairs(desc: Description) -> tuple:
    """(table, prompts: str or chat turns per row, responses) with empty fields refused."""
    msg_col = desc.column("messages")
    roles = ("messages",) if msg_col else ("prompt", "response")
    cols = [desc.column(r, r) for r in roles]
    table = read_table(desc, list(dict.fromkeys(cols + columns_for(desc))))
    prompts, responses = [], []
    for i in range(len(table)):
        if msg_col:
            turns = table.columns[msg_col][i]
            turns = [dict(t) for t in (turns if turns is not None else [])]
            if len(turns) < 2 or turns[-1].get("role") != "assistant" or any(
                    not str(t.get("content") or "").strip() for t in turns):
                raise DataError(f"{table.where(i)}: messages must be chat turns with non-empty content, "
                                "the last one from the assistant", problem=table.problem(i, "bad-json", msg_col))
            prompts.append([{"role": t["role"], "content": t["content"]} for t in turns[:-1]])
            responses.append(turns[-1]["content"])
        else:
            p, r = table.columns[cols[0]][i], table.columns[cols[1]][i]
            for role, col, v in (("prompt", cols[0], p), ("response", cols[1], r)):
                if v is None or not str(v).strip():
                    raise DataError(f"{table.where(i)}: the {role} ({col}) is empty",
                                    problem=table.problem(i, "empty-value", col))
            prompts.append(str(p))
            responses.append(str(r))
    return table, prompts, np.asarray(responses, dtype=object)


def prepare_instruct(desc: Description, contract: Contract, site_id: str = "", source: str = ""):
    from .families import Prepared, _split

    table, prompts, responses = read_pairs(desc)
    lab = finish(desc, table, np.zeros(len(table), dtype=np.int64))
    width = contract.text_length if contract.text_length != Contract().text_length else PROMPT_TOKENS
    contract = dataclasses.replace(contract, text_length=width)

    def rows(idx: np.ndarray) -> InstructRows:
        return InstructRows([prompts[i] for i in idx], responses[idx], source, width, contract.prompt_template)

    split = _split(site_id, lab, rows(lab.train), rows(lab.test))
    texts = [p if isinstance(p, str) else "\n".join(t["content"] for t in p) for p in prompts]
    return Prepared(desc, contract, lab, split, {"texts": texts})


class InstructTask(MedicalLlmTask):
    name = "instruct"
    num_classes = 2    # scores are [1 - p, p], p the mean per-token probability of the gold response
    primary_metric = "exact_match"
    defaults = {k: v for k, v in MedicalLlmTask.defaults.items() if k != "sites"}

    def load_site(self, site_id: str, cfg: RunConfig) -> SiteSplit:
        from .families import _own_folder

        return prepare_instruct(_own_folder(cfg, "instruct"), Contract.from_config(cfg), site_id,
                                model_source(cfg)).split

    def build_model(self, cfg: RunConfig) -> torch.nn.Module:
        return self.build_lm(cfg, ())

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, np.ndarray]:
        prompt, pmask, answers, amask, _ = batch
        source, _ = getattr(model, "_module", model).fedcare_answer_space
        tok = tokenizer(source)
        logp = _forward_answers(model, prompt, pmask, answers, amask)
        n_tok = amask.sum(1).clamp(min=1)
        p = torch.exp(logp.sum(1) / n_tok).double().cpu().numpy()
        out = model.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=RESPONSE_TOKENS,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=end_token(tok))
        generated = tok.batch_decode(out[:, prompt.shape[1]:], skip_special_tokens=True)
        gold = tok.batch_decode(answers, skip_special_tokens=True)
        match = np.array([normalise_answer(g) == normalise_answer(a) for g, a in zip(generated, gold)])
        self._extras.append((match, (-logp.sum(1)).double().cpu().numpy(), n_tok.cpu().numpy()))
        return np.stack([1 - p, p], axis=1), np.ones(len(p), dtype=int)

    def metrics(self, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        extras, self._extras = self._extras, []
        if not extras:
            return {"exact_match": float("nan"), "answer_perplexity": float("nan"), "accuracy": float("nan")}
        match, nll, tokens = (np.concatenate(x) for x in zip(*extras))
        em = float(match.mean())
        return {"exact_match": em, "accuracy": em, "answer_perplexity": float(np.exp(nll.sum() / max(tokens.sum(), 1))),
                "response_token_probability": float(scores[:, 1].mean()) if len(scores) else float("nan")}
