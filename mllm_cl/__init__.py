"""mllm-cl: continual learning for multimodal LLMs, from scratch in plain PyTorch.

The public entry points are imported lazily so that `import mllm_cl` stays cheap.
"""

from importlib import import_module
from typing import Any

_PUBLIC = {
    "load_llm": "mllm_cl.weights",
    "save_llm": "mllm_cl.weights",
    "load_vision_tower": "mllm_cl.weights",
    "save_vision_tower": "mllm_cl.weights",
    "load_tokenizer": "mllm_cl.tokenizer",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mllm_cl' has no attribute {name!r}")
