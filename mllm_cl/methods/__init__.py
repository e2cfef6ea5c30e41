"""Continual-learning methods, each a small plug-in with hooks at fixed points of the task loop.

`build_methods(["msgm", "rehearsal"], options)` returns the composed list; see `base.Method` for the hooks.
"""

from mllm_cl.methods.base import METHOD_NAMES, Method, TaskContext, build_methods

__all__ = ["METHOD_NAMES", "Method", "TaskContext", "build_methods"]
