"""The models (PaLM, Llama) over a paged KV cache, their configs, weights format and
tokenizers."""

from .attention_metadata import AttentionMetadata
from .checkpoint import CheckpointError
from .config import PaLMConfig
from .decoder import DecoderModel
from .kv_cache import KVCache
from .llama import Llama
from .llama_config import LlamaConfig
from .model_config import ModelConfig
from .palm import PaLM
from .tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, Tokenizer, load_tokenizer
from .weights import load_config, load_model, save_model_dir

__all__ = [
    "AttentionMetadata",
    "ByteTokenizer",
    "CheckpointError",
    "DecoderModel",
    "HFTokenizer",
    "IncrementalDetokenizer",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "ModelConfig",
    "PaLM",
    "PaLMConfig",
    "Tokenizer",
    "load_config",
    "load_model",
    "load_tokenizer",
    "save_model_dir",
]
