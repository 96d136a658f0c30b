"""`qwen25 export`: the HF directory loads in transformers with the official chat template and the same logits; the
GGUF file has llama.cpp's qwen2 names, hyper-parameters, vocabulary and template; tokenizers keep their template."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import gguf
import pytest
import numpy as np
import torch
from tokenizer_fixtures import read_template, require_qwen_vocab

from qwen25.cli import main
from qwen25.config import ModelConfig
from qwen25.export import GGUF_TYPES, _special_ids, export_model, gguf_tensor_name, gguf_vocabulary
from qwen25.model import CausalLM, load_model, save_model
from qwen25.tokenizer import (DEFAULT_SYSTEM_PROMPT, Tokenizer, TokenizerError, official_chat_template, render_chat,
                              train_tokenizer)

TEXT = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 20
CUSTOM = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city (天气)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CHAT = [
    {"role": "system", "content": "Use tools wisely."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Let me check.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21°C in Paris."},
    {"role": "user", "content": "Thanks!"},
]
PLAIN_CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "2+2?"}]


def tiny_checkpoint(path: Path, tokenizer: Tokenizer, seed: int = 0, **changes) -> Path:
    """A tiny random fp32 checkpoint with the tokenizer's files; norms and biases random too (so a swapped name
    would show), and 20 embedding rows beyond the tokenizer."""
    cfg = ModelConfig.from_preset("tiny", vocab_size=len(tokenizer) + 20, **changes)
    model = CausalLM(cfg)
    model.init_weights(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    save_model(model, path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """(model directory, export directory) of an untied tiny model exported with a bf16 GGUF file."""
    root = tmp_path_factory.mktemp("export")
    model_dir = tiny_checkpoint(root / "model", tok, tie_word_embeddings=False)
    export_model(model_dir, root / "out", gguf_type="bf16")
    return model_dir, root / "out"


def reader_fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


# ---- the chat template -------------------------------------------------------------------------------------------
def test_official_template_is_qwens_file_byte_for_byte():
    assert official_chat_template() == read_template("qwen2_5.jinja")
    packaged = Path(__file__).resolve().parents[1] / "qwen25" / "tokenizer" / "qwen2_5.jinja"
    assert official_chat_template().encode("utf-8") == packaged.read_bytes()


@pytest.mark.parametrize("messages,tools", [(TOOL_CHAT, [WEATHER]), (PLAIN_CHAT, None), (TOOL_CHAT[1:], [WEATHER])],
                         ids=["system, tools, tool call and result", "no system prompt", "tools, no system prompt"])
def test_transformers_renders_the_exported_template_as_render_chat(exported, messages, tools):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(exported[1]))
    theirs = hf.apply_chat_template(copy.deepcopy(messages), tools=tools, tokenize=False, add_generation_prompt=True)
    assert theirs == render_chat(messages, tools, add_generation_prompt=True)
    assert (DEFAULT_SYSTEM_PROMPT in theirs) == (messages[0]["role"] != "system")


def test_transformers_gives_the_same_logits(exported, tok):
    from transformers import AutoModelForCausalLM

    model_dir, out = exported
    ours = load_model(model_dir, dtype="fp32")
    theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=0)
    # without a generation_config.json in the model directory: the tokenizer's eos, and <|im_end|> for chat
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": [tok.eos_id, tok.im_end_id]}


# ---- tokenizers keep their template ------------------------------------------------------------------------------
def test_save_keeps_a_loaded_template_in_either_form(tok, tmp_path):
    tok.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == official_chat_template()  # a ChatML vocabulary always gets one
    named = [{"name": "default", "template": CUSTOM}, {"name": "tool_use", "template": official_chat_template()}]
    for template in (CUSTOM, named):
        config["chat_template"] = template
        (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps(config))
        Tokenizer.from_dir(tmp_path / "a").save(tmp_path / "b")
        assert Tokenizer.from_dir(tmp_path / "b").vocab.chat_template == template
        assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())["chat_template"] == template


def test_template_file_of_transformers_is_read_and_moved_into_the_config(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(CUSTOM)  # transformers >= 4.43 may save it here
    again = Tokenizer.from_dir(tmp_path)
    assert again.vocab.chat_template == CUSTOM
    again.save(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == CUSTOM


def test_vocabulary_without_chatml_tokens_gets_no_template_and_bad_ones_are_named(tmp_path):
    train_tokenizer(TEXT, vocab_size=300, control_tokens=["<|endoftext|>"], special_count=1, out_dir=tmp_path)
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": {"x": 1}}))
    with pytest.raises(TokenizerError, match="chat_template must be a string or a list"):
        Tokenizer.from_dir(tmp_path)


# ---- GGUF --------------------------------------------------------------------------------------------------------
def test_tensor_names_are_llama_cpps():
    cfg = ModelConfig.from_preset("tiny", tie_word_embeddings=False)
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for name in CausalLM(cfg).state_dict():
        assert gguf_tensor_name(name) == table.get_name(name, try_suffixes=(".weight", ".bias")), name


def test_gguf_bf16_has_the_model_tokenizer_and_template(exported, tok):
    model_dir, out = exported
    model = load_model(model_dir, dtype="fp32")
    cfg = model.config
    reader = gguf.GGUFReader(out / "model-bf16.gguf")
    fields = reader_fields(reader)
    assert fields["general.architecture"] == "qwen2"
    assert {k: fields[f"qwen2.{k}"] for k in ("context_length", "embedding_length", "block_count",
                                              "feed_forward_length", "attention.head_count",
                                              "attention.head_count_kv")} == {
        "context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
        "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads}
    assert fields["qwen2.rope.freq_base"] == cfg.rope_theta
    assert fields["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    assert fields["tokenizer.chat_template"] == official_chat_template()
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size
    assert tokens[:len(tok)] == [tok.id_to_token(i) for i in range(len(tok))]
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert types[tok.im_end_id] == gguf.TokenType.CONTROL
    assert types[tok.token_to_id("<tool_call>")] == gguf.TokenType.USER_DEFINED
    assert len(fields["tokenizer.ggml.merges"]) == len(tok.vocab.merges)
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_id and fields["tokenizer.ggml.add_bos_token"] is False

    weights = {gguf_tensor_name(n): t for n, t in model.state_dict().items()}
    assert {t.name for t in reader.tensors} == set(weights) and "output.weight" in weights
    for tensor in reader.tensors:
        want = weights[tensor.name]
        got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        if want.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(got, want), tensor.name
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16
            assert torch.equal(got, want.to(torch.bfloat16).float()), tensor.name


def test_gguf_q8_0_of_a_tied_model_with_a_custom_template(tok, tmp_path, capsys):
    model_dir = tiny_checkpoint(tmp_path / "model", tok, seed=1)
    (tmp_path / "custom.jinja").write_text(CUSTOM)
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "out"), "--gguf", "q8_0",
                 "--chat-template", str(tmp_path / "custom.jinja")]) == 0
    assert "model-q8_0.gguf" in capsys.readouterr().out
    assert Tokenizer.from_dir(tmp_path / "out").vocab.chat_template == CUSTOM
    reader = gguf.GGUFReader(tmp_path / "out" / "model-q8_0.gguf")
    assert reader_fields(reader)["tokenizer.chat_template"] == CUSTOM
    model = load_model(model_dir, dtype="fp32")
    weights = {gguf_tensor_name(n): t for n, t in model.state_dict().items() if n != "lm_head.weight"}
    assert {t.name for t in reader.tensors} == set(weights)  # tied: no output.weight, llama.cpp reuses token_embd
    for tensor in reader.tensors:
        want = weights[tensor.name]
        got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        if want.ndim == 2 and want.shape[1] % 32 == 0:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, tensor.name
            blocks = want.reshape(want.shape[0], -1, 32)
            step = blocks.abs().amax(-1, keepdim=True) / 127  # one quantisation step per block of 32
            # half a step of rounding, plus the fp16 rounding of the block's scale times up to 127
            assert ((got.reshape(blocks.shape) - blocks).abs() <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), \
                tensor.name
        else:  # norms and biases in F32; ffn_down's rows of 176 are not whole blocks of 32: BF16
            want_type = "F32" if want.ndim == 1 else "BF16"
            assert tensor.tensor_type.name == want_type, tensor.name
            assert torch.equal(got, want if want.ndim == 1 else want.to(torch.bfloat16).float()), tensor.name


def test_gguf_q4_0_holds_the_weights_of_serve_int4(tok, tmp_path):
    """--gguf q4_0: every matrix with whole blocks of 32 in Q4_0, byte for byte the weights `qwen25 serve --int4`
    multiplies (quant.quantize_q4), the tied output/embedding matrix in Q8_0 (8-bit, as --int4 keeps the output
    layer), the rest as for q8_0."""
    from qwen25.serve.quant import quantize_q4

    model_dir = tiny_checkpoint(tmp_path / "model", tok, seed=2)
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "out"), "--gguf", "q4_0"]) == 0
    reader = gguf.GGUFReader(tmp_path / "out" / "model-q4_0.gguf")
    weights = {gguf_tensor_name(n): t for n, t in load_model(model_dir, dtype="fp32").state_dict().items()
               if n != "lm_head.weight"}
    kinds = set()
    for tensor in reader.tensors:
        want = weights[tensor.name]
        if tensor.name == "token_embd.weight":
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
        elif want.ndim == 2 and want.shape[1] % 32 == 0:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0, tensor.name
            qweight, scales = quantize_q4(want)
            raw = torch.from_numpy(np.asarray(tensor.data).reshape(-1, 18).copy())
            assert torch.equal(raw[:, :2].contiguous().view(torch.float16).view(-1), scales.view(-1)), tensor.name
            assert torch.equal(raw[:, 2:], qweight.view(-1, 16)), tensor.name
        kinds.add(tensor.tensor_type.name)
    assert {"Q4_0", "Q8_0", "F32", "BF16"} <= kinds  # BF16: ffn_down's rows of 176


def test_gguf_vocabulary_of_qwen_is_the_converters():
    """Qwen2.5's own vocabulary as llama.cpp's converter writes it: transformers' tokens, CONTROL for special and
    <|...|> tokens, USER_DEFINED for <tool_call>, [PADn] up to the embedding's 151,936 rows."""
    from transformers import AutoTokenizer

    folder = require_qwen_vocab()
    tokenizer = Tokenizer.from_dir(folder, keep_extra_tokens=False, engine="python")  # Qwen2.5's 151,665 tokens
    tokens, types, merges = gguf_vocabulary(tokenizer, 151936)
    hf = AutoTokenizer.from_pretrained(str(folder))  # this package's files add Qwen3's tokens from 151,665 on
    assert tokens[:151665] == hf.convert_ids_to_tokens(list(range(151665)))
    assert tokens[151665:] == [f"[PAD{i}]" for i in range(151665, 151936)]
    expected = {151643: "CONTROL", 151644: "CONTROL", 151657: "USER_DEFINED", 151658: "USER_DEFINED",
                151659: "CONTROL", 151664: "CONTROL", 151665: "UNUSED", 0: "NORMAL", 151642: "NORMAL"}
    assert {i: gguf.TokenType(types[i]).name for i in expected} == expected
    raw = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in raw]
    assert _special_ids(tokenizer, ModelConfig.from_preset("0.5b-instruct")) == {"bos": 151643, "eos": 151645,
                                                                                   "pad": 151643}


def test_export_errors_name_the_problem(tok, tmp_path, capsys):
    model_dir = tiny_checkpoint(tmp_path / "model", tok)
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab.json", "merges.txt"))
    assert main(["export", "--model", str(bare), "--out", str(tmp_path / "x")]) == 2
    assert "has no tokenizer files" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["export", "--model", str(model_dir), "--out", str(model_dir)]) == 2
    assert "is the model directory itself" in capsys.readouterr().err
    save_model(CausalLM(ModelConfig.from_preset("tiny-moe", vocab_size=len(tok))), tmp_path / "moe")
    tok.save(tmp_path / "moe")
    assert main(["export", "--model", str(tmp_path / "moe"), "--out", str(tmp_path / "y"), "--gguf", "bf16"]) == 2
    assert "qwen2_moe" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert set(GGUF_TYPES) == {"bf16", "q8_0", "q4_0"}


# ---- llama.cpp itself, when a build is at hand -------------------------------------------------------------------
def _llama_server() -> Path:
    build = os.environ.get("LLAMA_CPP_BUILD")
    if not build:
        pytest.skip("set LLAMA_CPP_BUILD to a llama.cpp build directory (with bin/llama-server) to run this check")
    for candidate in (Path(build) / "bin" / "llama-server", Path(build) / "llama-server"):
        if candidate.is_file():
            return candidate
    pytest.skip(f"LLAMA_CPP_BUILD={build} has no bin/llama-server")


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_llama_cpp_renders_our_chats_and_computes_our_logits(exported):
    """llama-server on the bf16 file: its template rendering equals render_chat, and its log-probabilities equal
    ours (with the weights rounded to bf16 as in the file; llama.cpp's bf16 matmuls leave ~1e-3)."""
    server = _llama_server()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([str(server), "-m", str(exported[1] / "model-bf16.gguf"), "--jinja", "-c", "512",
                                "--host", "127.0.0.1", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("llama-server did not become healthy in 30 s")
        for messages, tools in ((TOOL_CHAT, [WEATHER]), (PLAIN_CHAT, None)):
            prompt = _post(f"{url}/apply-template", {"messages": messages, **({"tools": tools} if tools else {})})
            assert prompt["prompt"] == render_chat(messages, tools, add_generation_prompt=True)
        model = load_model(exported[0], dtype="bf16").float()
        ids = torch.randint(0, model.config.vocab_size - 20, (16,), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = torch.log_softmax(model(ids[None])[0, -1], -1)
        reply = _post(f"{url}/completion", {"prompt": ids.tolist(), "n_predict": 1, "n_probs": 5,
                                            "temperature": 0, "cache_prompt": False})
        top = reply["completion_probabilities"][0]["top_logprobs"]
        assert [t["id"] for t in top][:1] == [int(ours.argmax())]
        for t in top:
            assert t["logprob"] == pytest.approx(ours[t["id"]].item(), abs=2e-2)
    finally:
        process.terminate()
        process.wait(timeout=10)
