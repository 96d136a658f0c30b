"""ModelConfig: presets equal the official table, HF config.json in and out, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qwen25.config import (PRESETS, ConfigError, ModelConfig, flops_per_token, kv_cache_bytes_per_token,
                           param_count)

# The official table (Qwen2.5 technical report, Table 1, and the released config.json files).
OFFICIAL = """
| 0.5B | 896 | 24 | 14 | 2 | 64 | 4864 | 151936 | yes |
| 1.5B | 1536 | 28 | 12 | 2 | 128 | 8960 | 151936 | yes |
| 3B | 2048 | 36 | 16 | 2 | 128 | 11008 | 151936 | yes |
| 7B | 3584 | 28 | 28 | 4 | 128 | 18944 | 152064 | no |
| 14B | 5120 | 48 | 40 | 8 | 128 | 13824 | 152064 | no |
| 32B | 5120 | 64 | 40 | 8 | 128 | 27648 | 152064 | no |
| 72B | 8192 | 80 | 64 | 8 | 128 | 29568 | 152064 | no |
"""
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference.md"


def _table_rows(text: str):
    for m in re.finditer(r"^\| ([\d.]+B) \|(.+)\|\s*$", text, re.M):
        cells = [c.strip() for c in m.group(2).split("|")]
        if len(cells) == 8 and cells[0].isdigit():
            yield m.group(1), [int(c) for c in cells[:7]], cells[7] == "yes"


def _tables():
    tables = [("test", OFFICIAL)]
    if REFERENCE.is_file():  # the project's shared reference, when this checkout has it beside it
        tables.append(("reference.md", REFERENCE.read_text()))
    return tables


@pytest.mark.parametrize("source,text", _tables())
def test_presets_equal_official_table(source, text):
    rows = list(_table_rows(text))
    assert len(rows) == 7, source
    for size, (hidden, layers, heads, kv, head_dim, inter, vocab), tied in rows:
        for suffix in ("", "-instruct"):
            c = ModelConfig.from_preset(size.lower() + suffix)
            assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                    c.head_size, c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == \
                (hidden, layers, heads, kv, head_dim, inter, vocab, tied), (source, size, suffix)
            assert c.rope_theta == 1e6 and c.hidden_act == "silu" and not c.use_sliding_window


def test_instruct_and_base_differences():
    assert ModelConfig.from_preset("7b-instruct").eos_token_id == 151645
    assert ModelConfig.from_preset("7b").eos_token_id == 151643
    assert ModelConfig.from_preset("7b").max_position_embeddings == 131072
    assert ModelConfig.from_preset("3b").max_position_embeddings == 32768
    assert ModelConfig.from_preset("72b").rms_norm_eps == 1e-5
    assert ModelConfig.from_preset("72b-instruct").rms_norm_eps == 1e-6
    m1 = ModelConfig.from_preset("7b-instruct-1m")
    assert m1.rope_theta == 1e7 and m1.dual_chunk_attention_config["chunk_size"] == 262144


def test_sizes_from_config():
    c7 = ModelConfig.from_preset("7b")
    assert 7.5e9 < param_count(c7) < 7.7e9  # "7.61B" on the model card
    assert 6.4e9 < param_count(c7, embeddings=False) < 6.6e9  # "6.53B non-embedding"
    assert 0.48e9 < param_count(ModelConfig.from_preset("0.5b")) < 0.5e9  # "0.49B"
    assert 72.5e9 < param_count(ModelConfig.from_preset("72b")) < 72.9e9  # "72.7B"
    # GQA: 2 x 28 layers x 4 kv heads x 128 x 2 bytes
    assert kv_cache_bytes_per_token(c7, "bfloat16") == 2 * 28 * 4 * 128 * 2 == 57344
    assert kv_cache_bytes_per_token(c7, "float32") == 2 * 57344
    # at short context: 2 FLOPs per matmul weight (all but the embedding lookup; biases and norms are ~0.01%)
    matmul_weights = param_count(c7, embeddings=False) + c7.vocab_size * c7.hidden_size
    assert flops_per_token(c7, 1) == pytest.approx(2 * matmul_weights, rel=1e-3)
    assert flops_per_token(c7, 4096, training=True) == 3 * flops_per_token(c7, 4096)


def test_param_count_equals_the_module():
    import torch

    from qwen25.model import CausalLM

    for name in ("tiny", "mini"):
        cfg = ModelConfig.from_preset(name)
        with torch.device("meta"):
            model = CausalLM(cfg)
        assert param_count(cfg) == sum(p.numel() for p in model.parameters()), name


def test_official_config_json_round_trip():
    raw = {  # Qwen2.5-7B-Instruct's config.json as released
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
        "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 152064}
    cfg = ModelConfig.from_hf_dict(raw)
    assert cfg == ModelConfig.from_preset("7b-instruct", sliding_window=131072)
    out = cfg.to_hf_dict()
    assert {k: v for k, v in raw.items() if k != "transformers_version"} == out


def test_transformers_reads_our_config(tmp_path):
    from transformers import AutoConfig

    cfg = ModelConfig.from_preset("1.5b-instruct")
    cfg.save(tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "tie_word_embeddings", "rms_norm_eps", "eos_token_id"):
        assert getattr(hf, key) == getattr(cfg, key), key
    assert hf.rope_parameters["rope_theta"] == 1e6


def test_transformers_v5_config_is_read(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=5000.0).save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg.rope_theta == 5000.0 and cfg.rope_scaling is None and cfg.num_key_value_heads == 2


def test_unknown_keys_kept_with_warning(tmp_path):
    raw = ModelConfig.from_preset("tiny").to_hf_dict() | {"my_custom_flag": [1, 2]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="unknown key.*my_custom_flag"):
        cfg = ModelConfig.from_json(tmp_path)
    assert cfg.extra == {"my_custom_flag": [1, 2]}
    assert cfg.to_hf_dict()["my_custom_flag"] == [1, 2]


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": None}, "missing required key.*hidden_size"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"use_sliding_window": True}, "sliding-window attention is not supported"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    # issue 28: impossible values that used to load and run
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
    ({"max_position_embeddings": -1}, "max_position_embeddings must be a positive integer"),
    ({"rope_theta": 0}, "rope_theta must be a finite number > 0"),
    ({"rope_theta": -10000.0}, "rope_theta must be a finite number > 0"),
    ({"rope_theta": "1e6"}, "rope_theta must be a finite number"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a finite number > 0"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false, got 'no'"),
    ({"use_cache": 1}, "use_cache must be true or false"),
    ({"attention_dropout": 1.0}, "attention_dropout must be below 1"),
    ({"eos_token_id": [151643, "x"]}, "eos_token_id must be a token id"),
    ({"bos_token_id": -1}, "bos_token_id must be a token id"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object or null"),
    ({"head_dim": True}, "head_dim must be a positive integer"),
    ({"max_window_layers": 2.5}, "max_window_layers must be a non-negative integer"),
])
def test_bad_configs_are_clear_errors(change, message):
    raw = ModelConfig.from_preset("tiny").to_hf_dict()
    for k, v in change.items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(raw)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="unknown preset '9b'.*0.5b"):
        ModelConfig.from_preset("9b")
    assert "qwen2.5-7b" not in PRESETS and ModelConfig.from_preset("Qwen2.5-7B").hidden_size == 3584


def test_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_json(tmp_path / "nowhere")


def test_config_files_read_exponent_numbers_as_floats(tmp_path):
    """PyYAML alone reads `lr: 1e-4` (and JSON's `1e-08`) as a string; our configs must not."""
    from qwen25.utils import load_config

    (tmp_path / "train.yaml").write_text("lr: 1e-4\neps: 1E-08\nsteps: 2_000\nbig: 3e4\nname: 1e-4x\nq: '1e-4'\n")
    (tmp_path / "train.json").write_text('{"lr": 3e-3, "eps": 1e-08, "steps": 10}')
    assert load_config(tmp_path / "train.yaml", ["clip=1e0"]) == {
        "lr": 1e-4, "eps": 1e-8, "steps": 2000, "big": 30000.0, "name": "1e-4x", "q": "1e-4", "clip": 1.0}
    assert load_config(tmp_path / "train.json") == {"lr": 3e-3, "eps": 1e-8, "steps": 10}
