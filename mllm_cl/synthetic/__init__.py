"""The synthetic world `make demo` runs on: invented creatures and their facts (text.py), pictures of shapes
and words (images.py), and the generator that writes them all with the VL tasks and a tokenizer (world.py)."""

from mllm_cl.synthetic.world import IMAGE_PREFIX, TASKS, WORLD_SIZES, WORLD_VERSION, build_world, main

__all__ = ["IMAGE_PREFIX", "TASKS", "WORLD_SIZES", "WORLD_VERSION", "build_world", "main"]
