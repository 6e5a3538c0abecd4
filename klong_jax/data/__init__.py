"""Trajectory data: format, tokenizers, the chat templates (GLM-4.5, ChatML), the ContextPolicy shared by the
agent and the splitter, splitting, packing. The Grain pipeline is `klong_jax.data.pipeline` (it
imports Grain), the TFDS builder `klong_jax.data.tfds_source`, seqio tasks
`klong_jax.data.seqio_tasks`.
"""
from klong_jax.data.chat_template import (ChatMLTemplate, ChatTemplate, Glm45Template, ParsedAssistant, Rendered,
                                         make_chat_template)
from klong_jax.data.context import (ContextConfig, ContextOverflow, ContextPolicy, ContextView,
                                    Episode, Truncation)
from klong_jax.data.packing import PackStats, pack_trajectories
from klong_jax.data.splitting import Window, sft_example, split, windows_from_episode
from klong_jax.data.tokenizer import (GGUFTokenizer, HuggingFaceTokenizer, SentencePieceTokenizer, Tokenizer,
                                      load_tokenizer)
from klong_jax.data.trajectory import (Message, ToolCall, Trajectory, TrajectoryError,
                                       parse_line, parse_trajectory, read_jsonl, split_turns,
                                       validate_file, write_jsonl)

__all__ = [
    "ChatMLTemplate", "ChatTemplate", "ContextConfig", "ContextOverflow", "ContextPolicy", "ContextView",
    "Episode", "GGUFTokenizer", "Glm45Template", "HuggingFaceTokenizer", "Message", "PackStats",
    "ParsedAssistant", "Rendered", "SentencePieceTokenizer", "ToolCall", "Tokenizer", "Trajectory",
    "TrajectoryError", "Truncation", "Window", "load_tokenizer", "make_chat_template", "pack_trajectories",
    "parse_line", "parse_trajectory", "read_jsonl", "sft_example", "split", "split_turns", "validate_file",
    "windows_from_episode", "write_jsonl",
]
