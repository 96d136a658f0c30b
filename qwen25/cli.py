"""The `qwen25` command: one entry point with a sub-command per stage. `qwen25 SUBCOMMAND --help` explains each."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .utils import add_common_flags, apply_threads

EPILOG = """examples:
  qwen25 init --preset tiny --out runs/tiny          write a random tiny checkpoint (HF layout)
  qwen25 info --preset 7b --context 131072           parameters, FLOPs/token, KV-cache memory
  qwen25 generate --model runs/tiny --prompt-ids 1,2,3 --max-new-tokens 16
  qwen25 tokenize --tokenizer DIR --text "Hello, Qwen"   token ids and counts
  qwen25 export --model DIR --out OUT --gguf q8_0   HF directory with the chat template, and a GGUF for llama.cpp
"""


def cmd_init(args) -> int:
    import torch

    from .config import ModelConfig
    from .generation import QWEN_INSTRUCT_DEFAULTS, SamplingParams
    from .model import CausalLM, save_model
    from .utils import parse_sets

    cfg = ModelConfig.from_preset(args.preset, **parse_sets(args.set))
    torch.manual_seed(args.seed)
    model = CausalLM(cfg)
    model.init_weights(seed=args.seed)
    gen = SamplingParams(**QWEN_INSTRUCT_DEFAULTS).to_generation_config() if args.preset.endswith("instruct") else {}
    if cfg.eos_token_ids:
        gen["eos_token_id"] = cfg.eos_token_ids
    out = save_model(model, args.out, dtype=args.dtype, generation_config=gen or None,
                     max_shard_size=args.max_shard_size)
    print(f"wrote a randomly initialised {args.preset} checkpoint to {out}")
    return 0


def cmd_presets(args) -> int:
    from .config import PRESETS, ModelConfig, human_count, param_count

    print(f"{'preset':<20} {'params':>8} {'hidden':>7} {'layers':>6} {'heads':>7} {'inter':>6} {'vocab':>7} tied")
    for name in PRESETS:
        c = ModelConfig.from_preset(name)
        heads = f"{c.num_attention_heads}/{c.num_key_value_heads}"
        print(f"{name:<20} {human_count(param_count(c)):>8} {c.hidden_size:>7} {c.num_hidden_layers:>6} "
              f"{heads:>7} {c.intermediate_size:>6} {c.vocab_size:>7} {'yes' if c.tie_word_embeddings else 'no'}")
    return 0


def cmd_info(args) -> int:
    from .config import (ModelConfig, flops_per_token, human_bytes, human_count, kv_cache_bytes_per_token,
                         param_count)

    if bool(args.preset) == bool(args.model):
        raise SystemExit("give exactly one of --preset NAME or --model DIR")
    cfg = ModelConfig.from_preset(args.preset) if args.preset else ModelConfig.from_json(args.model)
    total, body = param_count(cfg), param_count(cfg, embeddings=False)
    active = param_count(cfg, activated=True)  # MoE: the routed experts one token uses; = total if dense
    kv = kv_cache_bytes_per_token(cfg, args.kv_dtype)
    ctx = args.context or cfg.max_position_embeddings
    lines = {
        "model": args.preset or str(args.model),
        "shape": (f"hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, heads {cfg.num_attention_heads} q / "
                  f"{cfg.num_key_value_heads} kv x {cfg.head_size}, intermediate {cfg.intermediate_size}, "
                  f"vocab {cfg.vocab_size}, tied {cfg.tie_word_embeddings}"),
        "parameters": f"{total:,} ({human_count(total)}); without embeddings {body:,} ({human_count(body)})",
        **({"activated": f"{active:,} ({human_count(active)}) per token: top-{cfg.num_experts_per_tok} of "
                         f"{cfg.num_experts} experts x {cfg.moe_intermediate_size}, shared expert "
                         f"{cfg.shared_expert_intermediate_size}"} if cfg.is_moe else {}),
        "weights": f"{human_bytes(total * 2)} in bf16, {human_bytes(total * 4)} in fp32",
        "rope": f"theta {cfg.rope_theta:g}, scaling {cfg.rope_scaling}, max positions {cfg.max_position_embeddings}",
        "FLOPs/token": (f"forward {flops_per_token(cfg, ctx):.3e}, training {flops_per_token(cfg, ctx, True):.3e} "
                        f"at context {ctx}"),
        "KV cache": (f"{kv:,} bytes/token ({human_bytes(kv)}, {args.kv_dtype}); {human_bytes(kv * ctx * args.batch)} "
                     f"for {args.batch} x {ctx} tokens"),
    }
    import torch

    from .model.dca import long_context_estimate
    from .train.loop import measure_peak_flops

    est = long_context_estimate(cfg, ctx, args.flops or measure_peak_flops(torch.device("cpu"), torch.float32, 1024, 3))
    rate = f"{est['flops_per_second']:.3g} FLOP/s" + ("" if args.flops else " (measured fp32 matmul)")
    lines["prefill"] = (f"{est['prefill_flops']:.3e} FLOPs at {ctx} tokens ({est['attention_flops']:.2e} in attention, "
                        f"the same with DCA): {est['prefill_seconds']:.3g} s at {rate}")
    lines["attn memory"] = (f"scores of one layer: {human_bytes(est['scores_bytes_full'])} materialised (eager), "
                            f"{human_bytes(est['scores_bytes_dca'])} per DCA tile of {est['dca_tile']}")
    measured = measured_prefill(cfg, ctx, args.measured)
    lines["prefill, measured"] = measured["text"]
    if args.json:
        print(json.dumps({"parameters": total, "parameters_no_embeddings": body, "parameters_activated": active,
                          "kv_bytes_per_token": kv,
                          "flops_per_token_forward": flops_per_token(cfg, ctx), "context": ctx,
                          "kv_bytes_at_context": kv * ctx * args.batch, "long_context": est,
                          "prefill_measured": {k: v for k, v in measured.items() if k != "text"}}))
    else:
        for key, value in lines.items():
            print(f"{key:>12}: {value}")
    return 0


def measured_prefill(cfg, length: int, path: Path | None) -> dict:
    """Time and peak memory of a prompt of `length` tokens, dense and sparse, from measured prefills
    (model/prefill_cost.py); "text" says what and where from, or why there is no prediction."""
    from .config import human_bytes
    from .model import prefill_cost

    try:
        data, source = prefill_cost.load_runs(path)
        rates = prefill_cost.fit_rates(data)
    except (ValueError, KeyError, OSError) as e:
        return {"text": f"no prediction: {e}"}
    pred = prefill_cost.predict(cfg, length, data, rates)
    ram = prefill_cost.machine_memory()
    parts = [f"{mode} {value['seconds']:,.0f} s, peak memory {human_bytes(value['peak_bytes'])}"
             + (f" (more than this machine's {human_bytes(ram)})" if ram and value["peak_bytes"] > ram else "")
             for mode, value in pred.items()]
    count = {mode: sum(r["mode"] == mode for r in data["runs"]) for mode in ("dense", "sparse")}
    sparse = data.get("sparse", {})
    text = (f"{'; '.join(parts)} ({data['dtype']} weights and KV cache, prefill chunks of {data['prefill_chunk']}"
            f"{', sparse from %d keys, at most %d a query' % (sparse['min_length'], sparse['max_keys']) if sparse else ''}"
            f"; rates fitted to {count['dense']} dense and {count['sparse']} sparse prefills of the {data['preset']} shape "
            f"measured on "
            f"{data['machine']} with {data['threads']} threads, {data.get('date', '')}: {source})")
    return {"text": text, "source": str(source), "machine": data["machine"], **pred,
            "rates": {k: v for k, v in rates.items()}}


def cmd_generate(args) -> int:

    from .generation import SamplingParams, stream_generate, tokenizer_vocab_size
    from .model import load_model

    if bool(args.prompt_ids) == bool(args.prompt):
        raise SystemExit("give --prompt TEXT (needs tokenizer files in the model directory) or --prompt-ids")
    tokenizer = None
    if args.prompt:
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(args.model)
        prompts = [tokenizer.encode(p, allowed_special="none" if args.plain else "all") for p in args.prompt]
    else:
        try:
            prompts = [[int(t) for t in p.split(",") if t.strip()] for p in args.prompt_ids]
        except ValueError as e:
            raise SystemExit(f"--prompt-ids must be comma-separated integers ({e})") from e
    apply_threads(args)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.int8 or args.w8a8 or args.int4:
        from .serve.quant import prepare_for_decode

        print(f"model: {prepare_for_decode(model, int8=args.int8, w8a8=args.w8a8, int4=args.int4)}", file=sys.stderr)
    from .model.sparse import SparsePrefill

    model.sparse_prefill = SparsePrefill.from_flags(args)
    params = SamplingParams.from_flags(args, model.config.eos_token_ids)
    vocab_limit = len(tokenizer) if tokenizer is not None else tokenizer_vocab_size(args.model)
    outputs: list[list[int]] = [[] for _ in prompts]
    stream = args.stream and len(prompts) == 1
    decoder = tokenizer.decode_stream(skip_special_tokens=True) if tokenizer is not None and stream else None
    start = time.perf_counter()
    for step in stream_generate(model, prompts, params, vocab_limit):
        for row, token in zip(outputs, step):
            if token is not None:
                row.append(token)
        if stream and step[0] is not None:
            print(decoder.step(step[0]) if decoder else step[0], end="" if decoder else " ", flush=True)
    elapsed = time.perf_counter() - start
    if stream:
        print(decoder.flush() if decoder else "")
    else:
        for out in outputs:
            print(tokenizer.decode(out, skip_special_tokens=True) if tokenizer else ",".join(map(str, out)))
    n = sum(map(len, outputs))
    print(f"[{n} tokens in {elapsed:.2f} s, {n / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .export import export_model

    apply_threads(args)
    files = export_model(args.model, args.out, dtype=args.dtype, gguf_type=args.gguf, tokenizer_dir=args.tokenizer,
                         chat_template=args.chat_template, max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}: {', '.join(p.name for p in files)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen25", description="Qwen2.5 end to end: model, data, training, post-training, evaluation, serving.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a randomly initialised checkpoint of a preset (HF layout)",
                       description="Create a checkpoint directory (config.json, model.safetensors, "
                                   "generation_config.json) with random weights, initialised as transformers does.")
    p.add_argument("--preset", required=True, help="preset name (see `qwen25 presets`), e.g. tiny, 0.5b, 7b-instruct")
    p.add_argument("--out", required=True, type=Path, help="directory to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the saved weights")
    add_common_flags(p, sets="change a config field, e.g. --set num_hidden_layers=4")
    p.add_argument("--max-shard-size", default="5GB", help="split weights into shards of at most this size")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("presets", help="list the named model presets")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("info", help="parameters, FLOPs per token and KV-cache memory of a preset or checkpoint",
                       description="Sizes derived from the config: parameter count, forward/training FLOPs per "
                                   "token, and KV-cache bytes per token with GQA (2 x layers x kv_heads x "
                                   "head_dim x bytes) and at a given context length.")
    p.add_argument("--preset", help="a preset name")
    p.add_argument("--model", type=Path, help="a checkpoint directory (reads its config.json)")
    p.add_argument("--context", type=int, help="context length for FLOPs and KV memory (default: max positions)")
    p.add_argument("--batch", type=int, default=1, help="sequences held in the KV cache (default 1)")
    p.add_argument("--kv-dtype", default="bfloat16", help="KV-cache dtype (bfloat16, float32, int8)")
    p.add_argument("--flops", type=float, help="FLOP/s for the prefill-time estimate (default: a measured fp32 matmul)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--measured", type=Path, metavar="FILE",
                   help="prefill measurements (benchmarks/long_prefill.py --ttft saves them; default: yours in "
                        "~/.cache/qwen25, else the project's, measured on its 2-core reference machine)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="continue token-id prompts with a checkpoint",
                       description="Generate from a checkpoint directory. Sampling defaults come from its "
                                   "generation_config.json; flags override them.")
    add_common_flags(p, model="checkpoint directory (HF layout)", dtype=True, threads=True, sampling=True)
    p.add_argument("--prompt", action="append", help="prompt text, encoded with the model directory's tokenizer "
                                                       "(repeat for a batch)")
    p.add_argument("--plain", action="store_true", help="encode control-token strings in --prompt as plain text")
    p.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    from .serve.cli import add_quant_flags

    add_quant_flags(p)
    add_common_flags(p, sparse=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a checkpoint as a complete HF directory (chat template included), "
                                      "optionally with a GGUF file for llama.cpp",
                       description="Write OUT as a directory transformers, vLLM and llama.cpp's converter load as it "
                                   "is: config.json, generation_config.json, safetensors, and tokenizer files with the "
                                   "chat template in tokenizer_config.json. --gguf TYPE also writes "
                                   "OUT/model-TYPE.gguf (llama.cpp's qwen2 architecture, tokenizer and chat template "
                                   "included).")
    add_common_flags(p, model="checkpoint directory to export (HF layout)", dtype=True, threads=True)
    p.add_argument("--out", required=True, type=Path, help="directory to write (not the model directory)")
    p.add_argument("--gguf", choices=["bf16", "q8_0", "q4_0"],
                   help="also write a GGUF file: bf16, or q8_0 (8-bit matrices; norms and biases stay f32)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="directory with the tokenizer files (default: the model directory)")
    p.add_argument("--chat-template", default="qwen2.5", metavar="qwen2.5|keep|FILE",
                   help="qwen2.5: Qwen2.5-Instruct's official template, the format qwen25 trains and serves with "
                        "(default); keep: the tokenizer's own; or a Jinja file")
    p.add_argument("--max-shard-size", default="5GB", help="split weights into shards of at most this size")
    p.set_defaults(func=cmd_export)

    from .data.cli import add_data_command
    from .evals.cli import add_eval_command
    from .post.cli import add_post_commands
    from .recipes.cli import add_recipe_command
    from .serve.cli import add_chat_command, add_serve_command
    from .tokenizer.cli import add_tokenize_command
    from .train.cli import add_train_commands

    add_tokenize_command(sub)
    add_eval_command(sub)
    add_post_commands(sub)
    add_data_command(sub)
    add_train_commands(sub)
    add_serve_command(sub)
    add_chat_command(sub)
    add_recipe_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # nothing here imports torch: --help and usage errors answer at once
    try:
        return args.func(args)
    except ValueError as e:  # bad input, named by what failed: ConfigError, CheckpointError, TokenizerError are these
        print(f"qwen25 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
