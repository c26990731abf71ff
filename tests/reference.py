"""The reference implementations, imported for use as oracles.

palm_rlhf_pytorch's package __init__ imports its RLHF trainers and their training-only
dependencies (not installed: see the Makefile), so its PaLM module is imported without
running that __init__."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def palm_pytorch_class():
    from palm_pytorch import PaLM

    return PaLM


def palm_rlhf_class():
    if "palm_rlhf_pytorch.palm" not in sys.modules:
        spec = importlib.util.find_spec("palm_rlhf_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("palm-rlhf-pytorch is not installed (make test installs it)")
        package = types.ModuleType("palm_rlhf_pytorch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("palm_rlhf_pytorch", package)
    return importlib.import_module("palm_rlhf_pytorch.palm").PaLM
