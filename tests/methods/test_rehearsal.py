import torch

from mllm_cl.methods.base import TaskContext
from mllm_cl.methods.rehearsal import Rehearsal, choose_replay


def test_share_is_as_configured_and_deterministic() -> None:
    first = choose_replay(1000, 0.01, seed=3, task_index=1)
    assert len(first) == 10 and first == choose_replay(1000, 0.01, seed=3, task_index=1)
    assert first != choose_replay(1000, 0.01, seed=4, task_index=1)
    assert len(choose_replay(50, 0.01, seed=0, task_index=0)) == 1  # at least one sample kept
    assert choose_replay(50, 0.0, seed=0, task_index=0) == []


def _ctx(index: int, name: str, n: int) -> TaskContext:
    return TaskContext(task_index=index, task_name=name, model=torch.nn.Linear(1, 1),
                       train_samples=[f"{name}-{i}" for i in range(n)], device=torch.device("cpu"))


def test_earlier_tasks_are_replayed_into_later_ones_only() -> None:
    method = Rehearsal(share=0.1, seed=0)
    sizes = {"color": 100, "count": 200, "read": 50}
    replayed_per_task = []
    for index, (name, n) in enumerate(sizes.items()):
        ctx = _ctx(index, name, n)
        method.before_task(ctx)
        replayed_per_task.append([s for s in ctx.train_samples if not s.startswith(name)])
        method.after_task(ctx)
    assert replayed_per_task[0] == []  # the first continual task has nothing to replay
    assert len(replayed_per_task[1]) == 10 and all(s.startswith("color") for s in replayed_per_task[1])
    assert len(replayed_per_task[2]) == 10 + 20
    # what a task keeps comes only from its own samples, never from what it replayed
    assert all(s.startswith("count") for s in method.buffer["count"])
