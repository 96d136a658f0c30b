"""The evaluation harness: a model's three scoring primitives and the loop that runs a Task over them.

`ModelLM` wraps a CausalLM and a tokenizer (anything with encode/decode) and offers what lm-evaluation-harness
asks of a model: loglikelihood(context, continuation), loglikelihood_rolling(text) and generate_until(context,
stop strings). `run_task` scores every example of a task with the primitive its kind needs and returns the
metrics plus one record per example:
  multiple_choice  log-likelihood of each continuation -> acc (argmax) and acc_norm (per byte), per subject
  math             greedy generation -> task.evaluate (answer extraction + equivalence)
  code             n samples per problem -> task.evaluate each in the sandbox -> pass@k (unbiased)
  perplexity       rolling log-likelihood -> bits per byte, perplexity per token
  preference       a reward scorer on chosen/rejected -> accuracy
  passkey          greedy generation on filler prompts -> accuracy per (length, depth)
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from ..generation import SamplingParams, TextTracker, stream_generate
from ..model import load_model
from ..post.logprobs import encode_pair, pair_batch
from ..tasks.passkey import passkey_sample
from ..tasks.task import Task
from ..tokenizer import Tokenizer, encode_chat
from ..verifiers.code import mean_pass_at_k


@dataclass
class EvalResult:
    """Metrics of one task run and a record per example."""

    task: str
    kind: str
    metrics: dict
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    model: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc)


class ModelLM:
    """A CausalLM + tokenizer exposing loglikelihood / loglikelihood_rolling / generate_until on text.

    `max_length` bounds one forward pass (default: the model's max_position_embeddings); longer inputs keep
    their last max_length tokens (log-likelihood) or are scored in windows (rolling).
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 eos_token_ids: list[int] | None = None, name: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_position_embeddings
        self.name = name
        if eos_token_ids is None:
            eos_token_ids = list(getattr(model.config, "eos_token_ids", None) or [])
            for attr in ("eos_id", "endoftext_id"):
                try:
                    eos_token_ids.append(int(getattr(tokenizer, attr)))
                except (AttributeError, ValueError, TypeError):
                    pass
        self.eos_token_ids = sorted(set(eos_token_ids))

    @classmethod
    def from_dir(cls, directory, dtype: str = "auto", batch_size: int = 8, **kwargs) -> "ModelLM":
        """Load a checkpoint directory (HF layout) and its tokenizer files."""
        return cls(load_model(directory, dtype=dtype), Tokenizer.from_dir(directory), batch_size,
                   name=str(directory), **kwargs)

    # -- tokens ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def prefix_token(self) -> int:
        """The token a text's first token is conditioned on (rolling log-likelihood, an empty context): as lm-eval's
        hf backend, the tokenizer's bos token, which Qwen has none of, else its eos token (tokenizer_config.json's:
        <|endoftext|> for a base model, <|im_end|> for an instruct one); <|endoftext|> for a tokenizer without."""
        for attr in ("eos_id", "endoftext_id"):
            try:
                return int(getattr(self.tokenizer, attr))
            except (AttributeError, ValueError, TypeError):
                pass
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation as lm-eval splits them: trailing spaces of the context move to
        the continuation, the whole is encoded at once and split at the context's length."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return whole[:len(ctx)], whole[len(ctx):]

    # -- the three primitives --------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood_tokens(self, requests: list[tuple[list[int], list[int]]],
                             progress: bool = False) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether greedy decoding would produce the continuation)."""
        out: list[tuple[float, bool]] = []
        batches = range(0, len(requests), self.batch_size)
        for i in _progress(batches, "loglikelihood", progress):
            chunk = requests[i:i + self.batch_size]
            rows = []
            for ctx, cont in chunk:
                if not cont:
                    raise ValueError("a continuation needs at least one token")
                ids = (list(ctx) + list(cont))[-(self.max_length + 1):]
                if len(ids) < 2:  # an empty context: condition on the end-of-text token
                    ids = [self.prefix_token()] + ids
                rows.append(ids)
            width = max(len(r) - 1 for r in rows)
            inp = torch.zeros(len(rows), width, dtype=torch.long)
            for j, r in enumerate(rows):  # right padding: causal attention never sees it
                inp[j, :len(r) - 1] = torch.tensor(r[:-1])
            # The vocabulary projection only where a continuation token is predicted: with Qwen's 151,936-way
            # vocabulary, fp32 log-probabilities of every position of a batch of 8 x 2,048 would be 10 GB.
            hidden = self.model(inp.to(self._device()), return_hidden=True)
            spans = [(j * width + len(r) - 1 - len(cont), len(cont))  # (flat index of the first, how many)
                     for j, ((_, cont), r) in enumerate(zip(chunk, rows))]
            picked = torch.cat([torch.arange(start, start + n) for start, n in spans]).to(hidden.device)
            logprobs = self.model.lm_head(hidden.flatten(0, 1)[picked]).float().log_softmax(-1).cpu()
            for lp, ((_, cont), r) in zip(logprobs.split([n for _, n in spans]), zip(chunk, rows)):
                target = torch.tensor(r[-len(cont):])
                out.append((float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def loglikelihood(self, requests: list[tuple[str, str]], progress: bool = False) -> list[tuple[float, bool]]:
        """loglikelihood_tokens on text pairs (context, continuation)."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests], progress)

    def rolling_windows(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) windows that predict every token of `ids` exactly once, each with as much
        preceding context as fits in max_length; the first token is conditioned on the prefix token."""
        tokens = [self.prefix_token()] + list(ids)
        step = self.max_length
        windows = []
        for a in range(0, len(ids), step):
            b = min(a + step, len(ids))  # predict ids[a:b] = tokens[a+1:b+1] from tokens[s:b]
            s = max(0, b - self.max_length)
            windows.append((tokens[s:a + 1], tokens[a + 1:b + 1]))
        return windows

    def loglikelihood_rolling_tokens(self, sequences: list[list[int]], progress: bool = False) -> list[float]:
        """Sum of log p over every token of each sequence."""
        flat, owner = [], []
        for k, ids in enumerate(sequences):
            for w in self.rolling_windows(ids):
                flat.append(w)
                owner.append(k)
        totals = [0.0] * len(sequences)
        for k, (lp, _) in zip(owner, self.loglikelihood_tokens(flat, progress)):
            totals[k] += lp
        return totals

    def loglikelihood_rolling(self, texts: list[str], progress: bool = False) -> list[float]:
        return self.loglikelihood_rolling_tokens([self.encode(t) for t in texts], progress)

    def prompt_ids(self, prompt) -> list[int]:
        """Token ids of a task prompt: plain text, or chat messages rendered with the generation prompt."""
        if isinstance(prompt, str):
            return self.encode(prompt)
        return encode_chat(self.tokenizer, prompt, add_generation_prompt=True).ids

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], until: list[str] | None = None, max_new_tokens: int = 256,
                     temperature: float = 0.0, seed: int | None = None, progress: bool = False) -> list[str]:
        """Generated text per prompt, cut at the first stop string; a batch stops once every row has stopped."""
        texts = []
        batches = range(0, len(prompts), self.batch_size)
        for i in _progress(batches, "generate", progress):
            chunk = [p[-(self.max_length - max_new_tokens):] if len(p) + max_new_tokens > self.max_length else p
                     for p in prompts[i:i + self.batch_size]]
            params = SamplingParams(temperature=temperature,
                                    max_new_tokens=max_new_tokens, eos_token_ids=self.eos_token_ids,
                                    seed=None if seed is None else seed + i)
            trackers = [TextTracker(self.tokenizer, until or []) for _ in chunk]
            for _ in stream_generate(self.model, chunk, params, self._vocab_limit(), should_stop=trackers):
                pass
            texts += [tracker.release(final=True) for tracker in trackers]  # the text before any stop string
        return texts

    def generate_until(self, requests: list[tuple[str, dict]], progress: bool = False) -> list[str]:
        """lm-eval style: (context text, {"until": [...], "max_gen_toks": N, "temperature": T})."""
        out = []
        for context, kwargs in requests:  # one by one keeps the per-request settings simple
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            out += self.generate_ids([self.encode(context)], until, int(kwargs.get("max_gen_toks", 256)),
                                     float(kwargs.get("temperature", 0.0) or 0.0))
        return out

    def _device(self):
        return self.model.model.embed_tokens.weight.device

    def _vocab_limit(self) -> int | None:
        try:
            return len(self.tokenizer)
        except TypeError:
            return None


# ---- running a task ------------------------------------------------------------------------------------
def _multiple_choice(task, lm: ModelLM, examples, progress) -> tuple[dict, list[dict]]:
    requests, spans = [], []
    for ex in examples:
        context = task.prompt(ex)
        if not isinstance(context, str):
            raise ValueError(f"task {task.name!r}: log-likelihood scoring needs a plain-text prompt (chat: false)")
        conts = task.continuations(ex)
        spans.append((len(requests), len(conts)))
        requests += [(context, c) for c in conts]
    scores = lm.loglikelihood(requests, progress)
    records, by_subject = [], {}
    for ex, (start, n) in zip(examples, spans):
        lps = [scores[start + j][0] for j in range(n)]
        conts = task.continuations(ex)
        per_byte = [lp / max(1, len(c.encode())) for lp, c in zip(lps, conts)]
        pred, pred_norm = max(range(n), key=lps.__getitem__), max(range(n), key=per_byte.__getitem__)
        correct = task.evaluate(ex, pred)
        records.append({"gold": task.gold(ex), "pred": pred, "pred_norm": pred_norm, "logprobs": lps,
                        "correct": bool(correct), "correct_norm": bool(task.evaluate(ex, pred_norm)),
                        "subject": ex.get("subject")})
        by_subject.setdefault(ex.get("subject") or "all", []).append(bool(correct))
    metrics = {"acc": _mean(r["correct"] for r in records), "acc_norm": _mean(r["correct_norm"] for r in records)}
    if len(by_subject) > 1:
        metrics["acc_by_subject"] = {s: _mean(v) for s, v in sorted(by_subject.items())}
    return metrics, records


def _generate_and_check(task, lm: ModelLM, examples, progress, samples: int, temperature: float, seed: int,
                        workers: int) -> tuple[dict, list[dict]]:
    gen = task.spec.generation
    prompts = [lm.prompt_ids(task.prompt(ex)) for ex in examples]
    flat = [p for p in prompts for _ in range(samples)]
    texts = lm.generate_ids(flat, gen.get("stop"), int(gen.get("max_new_tokens", 256)),
                            temperature if samples == 1 or temperature > 0 else 0.8, seed, progress)
    owners = [i for i in range(len(examples)) for _ in range(samples)]
    with ThreadPoolExecutor(workers) as pool:  # code checks run in sandbox processes: overlap them
        verdicts = list(_progress(pool.map(lambda k: bool(task.evaluate(examples[owners[k]], texts[k])),
                                           range(len(texts))), "check", progress))
    records = []
    for i, ex in enumerate(examples):
        mine = [k for k in range(len(texts)) if owners[k] == i]
        records.append({"id": ex.get("task_id", i), "completions": [texts[k] for k in mine],
                        "correct": [verdicts[k] for k in mine]})
    metrics = {"acc": _mean(v for r in records for v in r["correct"])}
    if task.kind == "code":
        counts = [(len(r["correct"]), sum(r["correct"])) for r in records]
        metrics = {f"pass@{k}": mean_pass_at_k(counts, k) for k in (1, 5, 10, 100) if k <= samples}
        metrics["solved"] = sum(c > 0 for _, c in counts)
        metrics["problems"] = len(counts)
    return metrics, records


def _perplexity(task, lm: ModelLM, examples, progress) -> tuple[dict, list[dict]]:
    texts = [ex["text"] for ex in examples]
    ids = [lm.encode(t) for t in texts]
    lps = lm.loglikelihood_rolling_tokens(ids, progress)
    records = [{"logprob": lp, "tokens": len(i), "bytes": len(t.encode())} for lp, i, t in zip(lps, ids, texts)]
    nll, tokens, nbytes = -sum(lps), sum(len(i) for i in ids), sum(len(t.encode()) for t in texts)
    return {"bits_per_byte": nll / math.log(2) / max(nbytes, 1), "perplexity": math.exp(nll / max(tokens, 1)),
            "tokens": tokens, "bytes": nbytes}, records


def _preference(task, scorer, examples, progress) -> tuple[dict, list[dict]]:
    if scorer is None:
        raise ValueError(f"task {task.name!r} (preference) needs a reward scorer: scorer(example) -> (r_chosen, "
                         "r_rejected); from the CLI give a reward-model directory as --model")
    records = []
    for ex in _progress(examples, "pairs", progress):
        chosen, rejected = scorer(ex)
        records.append({"chosen": chosen, "rejected": rejected, "correct": bool(task.evaluate(ex, (chosen, rejected)))})
    return {"acc": _mean(r["correct"] for r in records),
            "margin": _mean(r["chosen"] - r["rejected"] for r in records)}, records


def _passkey(task, lm: ModelLM, examples, progress) -> tuple[dict, list[dict]]:
    records = []
    for ex in _progress(examples, "passkey", progress):
        sample = passkey_sample(lm.tokenizer, int(ex["length"]), float(ex["depth"]), int(ex["passkey"]))
        new = len(lm.encode(f" {sample.passkey}")) + 2
        text = lm.generate_ids([sample.ids], None, new)[0]
        records.append({**ex, "output": text, "correct": bool(task.evaluate(ex, text))})
    cells = {}
    for r in records:
        cells.setdefault(f"{r['length']}@{r['depth']}", []).append(r["correct"])
    return {"acc": _mean(r["correct"] for r in records),
            "acc_by_cell": {k: _mean(v) for k, v in cells.items()}}, records


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def run_task(task: Task, lm: ModelLM | None = None, progress: bool = True, samples: int = 1,
             temperature: float = 0.0, seed: int = 0, workers: int = 4, scorer=None) -> EvalResult:
    """Score every example of `task` and return the metrics and records (see the module docstring)."""
    start = time.perf_counter()
    examples = task.examples()
    if not examples:
        raise ValueError(f"task {task.name!r} has no examples")
    if task.kind != "preference" and lm is None:
        raise ValueError(f"task {task.name!r} ({task.kind}) needs a model")
    if task.kind == "multiple_choice":
        metrics, records = _multiple_choice(task, lm, examples, progress)
    elif task.kind in ("math", "code"):
        metrics, records = _generate_and_check(task, lm, examples, progress, samples, temperature, seed, workers)
    elif task.kind == "perplexity":
        metrics, records = _perplexity(task, lm, examples, progress)
    elif task.kind == "preference":
        metrics, records = _preference(task, scorer, examples, progress)
    elif task.kind == "passkey":
        metrics, records = _passkey(task, lm, examples, progress)
    else:
        raise ValueError(f"no runner for task kind {task.kind!r}")
    metrics["examples"] = len(examples)
    return EvalResult(task.name, task.kind, metrics, records, time.perf_counter() - start,
                      getattr(lm, "name", "") if lm is not None else "")


def reward_model_scorer(rm, tokenizer=None):
    """scorer(example) -> (r_chosen, r_rejected) from a qwen25 reward model (qwen25.post.reward)."""
    @torch.inference_mode()
    def scorer(example: dict) -> tuple[float, float]:
        rm.eval()
        chosen, rejected = rm.rewards(pair_batch([encode_pair(example, tokenizer)])).tolist()
        return chosen, rejected
    return scorer
