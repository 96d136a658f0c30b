"""Qwen2.5's byte-level BPE tokenizer (encode/decode/train) and its ChatML chat format (rendering, tool calls)."""

from .bbpe import StreamDecoder, Tokenizer
from .chat import DEFAULT_SYSTEM_PROMPT, ChatEncoding, Segment, chat_segments, encode_chat, render_chat
from .files import QWEN_CONTROL_TOKENS, QWEN_PATTERN, AddedToken, TokenizerError, Vocabulary, official_chat_template
from .tool_calls import ParsedOutput, ToolCall, ToolCallError, ToolCallParser, parse_tool_calls
from .train import train_tokenizer

__all__ = [
    "AddedToken", "ChatEncoding", "DEFAULT_SYSTEM_PROMPT", "ParsedOutput", "QWEN_CONTROL_TOKENS", "QWEN_PATTERN",
    "Segment", "StreamDecoder", "Tokenizer", "TokenizerError", "ToolCall", "ToolCallError", "ToolCallParser",
    "Vocabulary", "chat_segments", "encode_chat", "official_chat_template", "parse_tool_calls", "render_chat",
    "train_tokenizer",
]
