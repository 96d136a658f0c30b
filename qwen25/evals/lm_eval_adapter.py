"""lm-evaluation-harness (`pip install lm-eval`) adapter: evaluate qwen25 checkpoints on its tasks.

lm-eval asks a model for three things over `Instance` requests; ModelLM already computes them:
  loglikelihood(requests)          args (context, continuation) -> (log p, is_greedy)
  loglikelihood_rolling(requests)  args (text,)                 -> log p of the whole text
  generate_until(requests)         args (context, gen_kwargs)   -> generated text, cut at gen_kwargs["until"]

Command line (lm-eval's own CLI does not import our package, so this module has a small one):

    python -m qwen25.evals.lm_eval_adapter --model runs/tiny --tasks arc_easy --limit 20
    python -m qwen25.evals.lm_eval_adapter --model runs/tiny --tasks my_task --include-path my_tasks/

or from Python: `lm_eval.simple_evaluate(model=QwenLMEval(ModelLM.from_dir(DIR)), tasks=[...])`.
"""

from __future__ import annotations

import argparse
import json

from ..utils import add_common_flags
from .harness import ModelLM


def _base():
    try:
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval") from e
    return LM


def make_lm_eval_model(lm: ModelLM):
    """An lm_eval.api.model.LM over a ModelLM (lm-eval is imported only here)."""
    return _adapter_class()(lm)


_CLASS = None


def _adapter_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    LM = _base()

    class QwenLMEval(LM):
        """lm-eval's LM interface answered by a qwen25 ModelLM."""

        def __init__(self, lm: ModelLM):
            super().__init__()
            self.lm = lm

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            """`pretrained=DIR,dtype=fp32,batch_size=8` (lm-eval's --model_args format)."""
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
            cfg = {k: v for k, v in (additional_config or {}).items() if v is not None}
            batch = int(args.get("batch_size", cfg.get("batch_size", 8)) or 8)
            return cls(ModelLM.from_dir(args["pretrained"], dtype=args.get("dtype", "auto"), batch_size=batch))

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.lm.loglikelihood([tuple(r.args[:2]) for r in requests], progress=not disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.lm.loglikelihood_rolling([r.args[0] for r in requests], progress=not disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self.lm.generate_until([(r.args[0], dict(r.args[1])) for r in requests])

        @property
        def tokenizer_name(self) -> str:
            return self.lm.name or "qwen25"

    _CLASS = QwenLMEval
    return _CLASS


def evaluate(model_dir: str, tasks: list[str], include_path: str | None = None, limit: float | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, dtype: str = "auto") -> dict:
    """Run lm-eval's simple_evaluate on a qwen25 checkpoint; returns its results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = make_lm_eval_model(ModelLM.from_dir(model_dir, dtype=dtype, batch_size=batch_size))
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                           bootstrap_iters=0, log_samples=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate a qwen25 checkpoint with lm-evaluation-harness tasks.")
    add_common_flags(p, model="checkpoint directory with tokenizer files", dtype=True)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="a folder of extra lm-eval task YAML files")
    p.add_argument("--limit", type=float, help="examples per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="write lm-eval's results as JSON here")
    args = p.parse_args(argv)
    results = evaluate(args.model, args.tasks.split(","), args.include_path, args.limit, args.num_fewshot,
                       args.batch_size, args.dtype)
    print(json.dumps(results["results"], indent=1, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results["results"], "config": results.get("config")}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
