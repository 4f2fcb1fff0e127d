"""Running a stage's units of work (ingest batches, frame shards, ...) concurrently.

A stage plans its units and hands `run(fn, units)` to a runner, which yields each unit with
its result, or with the exception that sank it, as units finish. Stages default to threads;
flows pass a runner that makes every unit a Prefect task (retries, UI visibility, any task
runner). `fn` and the units must pickle, so a distributed task runner can ship them.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

from stages.reporting import Reporter
from stages.threads import Pooled


class UnitRunner(Protocol):
    def __call__(
        self, fn: Callable[[Any], Any], units: Sequence[Any], *, workers: int, name: Callable[[Any], str]
    ) -> Iterator[tuple[Any, Any]]: ...


def thread_runner(
    fn: Callable[[Any], Any], units: Sequence[Any], *, workers: int, name: Callable[[Any], str] = str
) -> Iterator[tuple[Any, Any]]:
    units = list(units)
    # Units computing at once split the process's threads (stages/threads.py).
    fn = Pooled(fn, min(workers, len(units)))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="unit") as pool:
        pending = {pool.submit(fn, u): u for u in units}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                unit = pending.pop(fut)
                yield unit, (fut.exception() or fut.result())


@dataclass
class StageOutcome:
    """What a per-dataset stage run returns: its plan, the finished units' results (each with
    `n_videos` and `failures`), the units that crashed, and the summary logged as metrics."""

    plan: Any
    results: list[Any]
    errors: list[str]
    summary: dict

    @property
    def failures(self) -> list[dict]:
        return [f for r in self.results for f in r.failures]


def run_units(
    runner: UnitRunner,
    fn: Callable[[Any], Any],
    units: Sequence[Any],
    *,
    workers: int,
    name: Callable[[Any], str],
    describe: Callable[[Any], str],
    reporter: Reporter,
    label: str,
    progress: Callable[[list[Any]], dict[str, float]],
) -> tuple[list[Any], list[str]]:
    """Run every unit; a unit that crashes (after the runner's retries) is recorded in the
    returned errors and the others go on. Progress and running metrics go to `reporter`."""
    results: list[Any] = []
    errors: list[str] = []
    for unit, result in runner(fn, units, workers=workers, name=name):
        if isinstance(result, BaseException):
            errors.append(f"{describe(unit)}: {type(result).__name__}: {result}")
            reporter.warning(f"{label}: {errors[-1]}")
            continue
        results.append(result)
        reporter.advance(result.n_videos)
        reporter.metrics(progress(results), step=sum(r.n_videos for r in results))
    return results, errors
