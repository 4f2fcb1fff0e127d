"""Units of work as Prefect tasks, at most `workers` in flight whatever the task runner."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed

from stages.threads import Pooled


class Submitter(Protocol):
    """What `prefect_runner` submits through instead of the flow's own task runner: a started
    Prefect `TaskRunner` (e.g. prefect_dask's DaskTaskRunner) or anything with its `submit`."""

    def submit(self, task: Any, parameters: dict[str, Any]) -> PrefectFuture: ...


# The warehouse decides what is cached (a committed unit is never redone), so Prefect's own
# result caching stays off: it would need persisted results keyed on absolute paths that
# break when the data root moves (PITFALLS.md). Units are idempotent, so retries are safe.
@task(name="unit", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
def run_unit(fn: Callable[[Any], Any], unit: Any) -> Any:
    return fn(unit)


def prefect_runner(
    fn: Callable[[Any], Any],
    units: Sequence[Any],
    *,
    workers: int,
    name: Callable[[Any], str] = str,
    task_runner: Submitter | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Each unit as a `run_unit` task run of the current flow, yielded as units finish. Tasks go
    to the flow's task runner, or to `task_runner` when given (flows/dask_runner.py: a flow
    cannot swap its own runner once started); either way at most `workers` are in flight. On the
    flow's runner (threads of this process) each unit computes on its part of the process's threads."""
    in_flight: dict[PrefectFuture, Any] = {}
    queue = list(units)
    if task_runner is None:
        fn = Pooled(fn, min(workers, len(queue)))
    while queue or in_flight:
        while queue and len(in_flight) < max(1, workers):
            unit = queue.pop(0)
            named = run_unit.with_options(task_run_name=name(unit))
            if task_runner is None:
                future = named.submit(fn, unit)
            else:
                future = task_runner.submit(named, parameters={"fn": fn, "unit": unit})
            in_flight[future] = unit
        fut = next(as_completed(list(in_flight)))
        unit = in_flight.pop(fut)
        try:
            yield unit, fut.result()
        except Exception as e:  # noqa: BLE001 - the stage records it; other units go on
            yield unit, e
