"""The PaLM model over a paged KV cache, its config, weights format and tokenizers."""

from .attention_metadata import AttentionMetadata
from .config import PaLMConfig
from .kv_cache import KVCache, bytes_per_block, num_blocks_for_budget
from .llama import Llama
from .llama_config import LlamaConfig
from .palm import PaLM
from .tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, Tokenizer, load_tokenizer
from .weights import CheckpointError, load_config, load_model, save_model_dir

__all__ = [
    "AttentionMetadata",
    "ByteTokenizer",
    "CheckpointError",
    "HFTokenizer",
    "IncrementalDetokenizer",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "PaLM",
    "PaLMConfig",
    "Tokenizer",
    "bytes_per_block",
    "load_config",
    "load_model",
    "load_tokenizer",
    "num_blocks_for_budget",
    "save_model_dir",
]
