"""Running a stage's units of work (ingest batches, frame shards, ...) concurrently.

A stage plans its units and hands `run(fn, units)` to a runner, which yields each unit with
its result, or with the exception that sank it, as units finish. Stages default to threads;
flows pass a runner that makes every unit a Prefect task (retries, UI visibility, any task
runner). `fn` and the units must pickle, so a distributed task runner can ship them.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator, Protocol, Sequence


class UnitRunner(Protocol):
    def __call__(
        self, fn: Callable[[Any], Any], units: Sequence[Any], *, workers: int, name: Callable[[Any], str]
    ) -> Iterator[tuple[Any, Any]]: ...


def thread_runner(
    fn: Callable[[Any], Any], units: Sequence[Any], *, workers: int, name: Callable[[Any], str] = str
) -> Iterator[tuple[Any, Any]]:
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="unit") as pool:
        pending = {pool.submit(fn, u): u for u in units}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                unit = pending.pop(fut)
                yield unit, (fut.exception() or fut.result())
