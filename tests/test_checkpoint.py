"""HF safetensors checkpoints: sharded and single, tied aliasing, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen25.config import ModelConfig
from qwen25.model import CausalLM, CheckpointError, load_model, save_model
from qwen25.model.checkpoint import INDEX_FILE, checkpoint_files


def test_sharded_transformers_checkpoint_loads(hf_checkpoint):
    hf, path = hf_checkpoint(seed=1, max_shard_size="100KB", tie_word_embeddings=False)
    assert (path / INDEX_FILE).is_file() and len(list(path.glob("model-*.safetensors"))) > 2
    ours = load_model(path, dtype="fp32")
    ids = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_tied_checkpoint_aliases_lm_head(hf_checkpoint):
    _, path = hf_checkpoint(seed=2, tie_word_embeddings=True)
    assert "lm_head.weight" not in checkpoint_files(path)
    model = load_model(path, dtype="fp32")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_our_sharded_save_round_trips_and_transformers_reads_it(tmp_path):
    from transformers import Qwen2ForCausalLM

    cfg = ModelConfig.from_preset("tiny", tie_word_embeddings=False)
    model = CausalLM(cfg)
    model.init_weights(seed=3)
    save_model(model, tmp_path, max_shard_size="60KB", generation_config={"eos_token_id": [7, 8]})
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    reloaded = load_model(tmp_path, dtype="fp32")
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), hf(ids).logits, atol=1e-5, rtol=0)
    assert hf.generation_config.eos_token_id == [7, 8]


def test_bf16_save(tmp_path):
    model = CausalLM(ModelConfig.from_preset("tiny"))
    model.init_weights(seed=0)
    save_model(model, tmp_path, dtype="bf16")
    assert ModelConfig.from_json(tmp_path).torch_dtype == "bfloat16"
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    assert load_model(tmp_path).lm_head.weight.dtype == torch.bfloat16  # "auto" takes the config's dtype


def test_truncated_file_is_a_clear_error(hf_checkpoint):
    _, path = hf_checkpoint(seed=4)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(truncated|corrupt)"):
        load_model(path)


def test_wrong_shape_names_tensor_and_expected_shape(hf_checkpoint):
    _, path = hf_checkpoint(seed=5)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128  # checkpoint tensors were made with 112
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight: expected shape "
                                               r"\(\d+, \d+\), model\.safetensors has \(\d+, \d+\)"):
        load_model(path)


def test_missing_shard_is_named(hf_checkpoint):
    _, path = hf_checkpoint(seed=6, max_shard_size="100KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {victim.name}.*holds \\d+ tensors"):
        load_model(path)


def test_unsupported_dtype_and_missing_and_unexpected_tensors(tmp_path):
    model = CausalLM(ModelConfig.from_preset("tiny"))
    model.init_weights(seed=0)
    save_model(model, tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.self_attn.q_proj.bias"

    save_file({**tensors, name: tensors[name].to(torch.float64)}, file)
    with pytest.raises(CheckpointError, match=f"tensor {name} .*unsupported dtype F64"):
        load_model(tmp_path)

    save_file({k: v for k, v in tensors.items() if k != name}, file)
    with pytest.raises(CheckpointError, match=f"lacks 1 tensor.*{name}"):
        load_model(tmp_path)

    save_file({**tensors, "model.layers.9.mlp.gate.weight": torch.zeros(2, 2)}, file)
    with pytest.raises(CheckpointError, match="model.layers.9.mlp.gate.weight .* not part of this model"):
        load_model(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    ModelConfig.from_preset("tiny").save(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        load_model(tmp_path)


def test_fp16_refused_on_cpu_and_unknown_dtype(tmp_path):
    model = CausalLM(ModelConfig.from_preset("tiny"))
    model.init_weights(seed=0)
    save_model(model, tmp_path)
    with pytest.raises(CheckpointError, match="fp16 is not supported on CPU"):
        load_model(tmp_path, dtype="fp16")
    with pytest.raises(CheckpointError, match="unknown dtype 'int4'"):
        load_model(tmp_path, dtype="int4")


def test_loading_keeps_no_second_copy(tmp_path):
    """Peak anonymous memory while loading stays near one copy of the weights (meta init, streamed tensors).

    File pages of the memory-mapped safetensors file are not anonymous memory and are not counted.
    """
    cfg = ModelConfig.from_preset("tiny", vocab_size=32768, hidden_size=256, intermediate_size=1024,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=False)
    model = CausalLM(cfg)
    model.init_weights(seed=0)
    save_model(model, tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size  # ~85 MB of fp32
    script = textwrap.dedent(f"""
        import threading, time, torch
        from qwen25.model import load_model
        def anon():
            for line in open('/proc/self/status'):
                if line.startswith('RssAnon:'):
                    return int(line.split()[1]) * 1024
        before, peak, done = anon(), [0], threading.Event()
        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], anon())
                time.sleep(0.0005)
        t = threading.Thread(target=watch); t.start()
        model = load_model({str(tmp_path)!r}, dtype='fp32')
        done.set(); t.join()
        print(max(peak[0], anon()) - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    grown = int(out.stdout.strip().splitlines()[-1])
    # One copy of the weights; a random-init-then-load approach would hold two.
    assert grown < 1.3 * size, (grown, size)


def test_index_naming_files_outside_the_directory_is_refused(tmp_path):
    model = CausalLM(ModelConfig.from_preset("tiny", tie_word_embeddings=False))
    save_model(model, tmp_path / "m", max_shard_size="100KB")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[0]
    (tmp_path / "secret.safetensors").write_bytes(shard.read_bytes())
    for bad in ("../secret.safetensors", "/etc/passwd", "sub/model.safetensors", ".."):
        index = json.loads((tmp_path / "m" / INDEX_FILE).read_text())
        index["weight_map"]["model.norm.weight"] = bad
        (tmp_path / "m" / INDEX_FILE).write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="not a file name of"):
            load_model(tmp_path / "m")
    (tmp_path / "m" / INDEX_FILE).write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(CheckpointError, match="weight_map must map tensor names to file names"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("old_shard,new_shard", [("100KB", "100KB"), ("5GB", "100KB"), ("100KB", "5GB"),
                                                 ("5GB", "5GB")])
def test_interrupted_save_keeps_the_old_weights_loadable(tmp_path, monkeypatch, old_shard, new_shard):
    """Saving over a checkpoint and dying half way leaves the old weights intact (issue 28); a complete save
    replaces them and leaves no stale file behind."""
    import qwen25.model.checkpoint as ckpt

    cfg = ModelConfig.from_preset("tiny", tie_word_embeddings=False)
    torch.manual_seed(0)
    old, new = CausalLM(cfg), CausalLM(cfg)
    save_model(old, tmp_path, max_shard_size=old_shard)
    real, calls = ckpt.save_file, []

    def dies_on_the_second_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2 or new_shard == "5GB":
            raise KeyboardInterrupt
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        save_model(new, tmp_path, max_shard_size=new_shard)
    monkeypatch.setattr(ckpt, "save_file", real)
    loaded = load_model(tmp_path, dtype="fp32")
    for (name, a), b in zip(old.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for _ in range(2):  # twice: a sharded save over shards of the same names goes beside them
        save_model(new, tmp_path, max_shard_size=new_shard)
        loaded = load_model(tmp_path, dtype="fp32")
        for (name, a), b in zip(new.state_dict().items(), loaded.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        files = {p.name for p in tmp_path.glob("model*")}
        live = {p.name for p in checkpoint_files(tmp_path).values()}
        assert files == (live if new_shard == "5GB" else live | {INDEX_FILE})
