"""What the passkey-accuracy experiments share (kv_int8_accuracy.py, sparse_prefill_accuracy.py): their common flags,
the loaded model, and the lengths they test with the RoPE settings the recipe's evaluation uses at each."""

from __future__ import annotations

import torch

from qwen25.model import load_model
from qwen25.tokenizer import Tokenizer

DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def add_args(ap) -> None:
    """--model, --base-len, --multiples, --trials, --threads."""
    ap.add_argument("--model", required=True, help="a pre-trained checkpoint that retrieves (the recipe's phase 2)")
    ap.add_argument("--base-len", type=int, default=256, help="the length the model was first trained at")
    ap.add_argument("--multiples", default="1,4,16")
    ap.add_argument("--trials", type=int, default=4, help="prompts per length and depth (5 depths)")
    ap.add_argument("--threads", type=int, default=2)


def load(args):
    """(model in fp32, eval mode; tokenizer) of --model, with --threads set."""
    torch.set_num_threads(args.threads)
    return load_model(args.model, dtype="fp32").eval(), Tokenizer.from_dir(args.model)


def lengths(model, args):
    """(multiple, prompt tokens, rope_settings changes, "RoPE" or "DCA") per --multiples: plain RoPE within the trained
    length, DCA past it, configured as the recipe's evaluation configures it."""
    trained = model.config.max_position_embeddings
    for m in map(int, args.multiples.split(",")):
        length = args.base_len * m - 8
        dca = {"chunk_size": trained * 3 // 4, "local_size": trained // 8, "original_max_position_embeddings": trained}
        changes = {"dual_chunk_attention_config": dca} if length > trained else {}
        yield m, length, changes, "DCA" if changes else "RoPE"
