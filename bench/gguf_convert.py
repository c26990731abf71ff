"""Run llama.cpp's convert_hf_to_gguf.py on the tiny Llama, mapping its locally trained
byte-level BPE pre-tokenizer (GPT-2's regex, unknown to the converter's hash table) to
"gpt-2". Runs in the llama.cpp venv:

    bench/.venvs/llamacpp/venv/bin/python bench/gguf_convert.py LLAMA_CPP_DIR MODEL_DIR \
        --outfile OUT.gguf --outtype f32
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    llama_cpp = Path(sys.argv[1])
    sys.path.insert(0, str(llama_cpp))
    from conversion import base  # the converter's own module, shared with the script

    original = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"  # our tokenizer.json uses ByteLevel(use_regex=True): GPT-2's split

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    sys.argv = [str(llama_cpp / "convert_hf_to_gguf.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
