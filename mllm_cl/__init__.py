"""mllm-cl: continual learning for multimodal LLMs, from scratch in plain PyTorch (see README.md's code map)."""
