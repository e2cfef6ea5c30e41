"""Jobs side by side in worker processes: results, output and errors come back as in one process."""

from pathlib import Path

import pytest
import torch

from mllm_cl.errors import UserError
from mllm_cl.workers import Job, JobError, run_jobs


def square(x: int) -> int:
    print(f"squaring {x} with {torch.get_num_threads()} thread(s)")
    return x * x


class BadInput(UserError, ValueError):
    pass


def refuse(x: int) -> int:
    raise BadInput(f"{x} is not welcome")


def crash(x: int) -> int:
    return [x][1]


@pytest.mark.parametrize("workers", [1, 2])
def test_every_job_runs_and_reports_its_result(workers: int, tmp_path: Path) -> None:
    jobs = [Job(f"job {i}", square, (i,), tmp_path / f"{i}" / "output.log") for i in range(3)]
    results = {}
    run_jobs(jobs, workers, lambda job, result, seconds: results.update({job.name: (result, seconds >= 0)}))
    assert results == {"job 0": (0, True), "job 1": (1, True), "job 2": (4, True)}
    if workers > 1:  # each worker's output went to its job's log, with its share of the threads
        threads = max(1, torch.get_num_threads() // workers)
        assert (tmp_path / "2" / "output.log").read_text() == f"squaring 2 with {threads} thread(s)\n"


def test_a_failed_job_names_itself_its_error_and_its_log(tmp_path: Path) -> None:
    ok = Job("fine", square, (3,), tmp_path / "fine.log")
    with pytest.raises(JobError, match=r"^refusing job failed: 5 is not welcome \(its output: .*refuse.log\)$"):
        run_jobs([ok, Job("refusing job", refuse, (5,), tmp_path / "refuse.log")], 2, lambda *a: None)
    assert "error: 5 is not welcome" in (tmp_path / "refuse.log").read_text()
    with pytest.raises(JobError, match=r"crashing job failed: IndexError: list index out of range"):
        run_jobs([Job("crashing job", crash, (1,), tmp_path / "crash.log"), ok], 2, lambda *a: None)
    assert "Traceback" in (tmp_path / "crash.log").read_text()  # the whole story is in the log
    with pytest.raises(ValueError, match="workers must be at least 1"):
        run_jobs([ok], 0, lambda *a: None)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return text


def read(path: Path) -> str:
    return path.read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_jobs_followers_start_once_it_has_ended_and_read_what_it_wrote(workers: int, tmp_path: Path) -> None:
    ended = []
    follower = Job("reader", read, (tmp_path / "made.txt",), tmp_path / "reader.log")
    slow = Job("writer", write, (tmp_path / "made.txt", "made"), tmp_path / "writer.log", then=[follower])
    others = [Job(f"job {i}", square, (i,), tmp_path / f"{i}.log") for i in range(2)]
    run_jobs([slow] + others, workers, lambda job, result, seconds: ended.append((job.name, result)))
    assert sorted(ended) == [("job 0", 0), ("job 1", 1), ("reader", "made"), ("writer", "made")]
    assert [name for name, _ in ended].index("writer") < [name for name, _ in ended].index("reader")
