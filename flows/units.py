"""Units of work as Prefect tasks, at most `workers` in flight whatever the task runner."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed


# The warehouse decides what is cached (a committed unit is never redone), so Prefect's own
# result caching stays off: it would need persisted results keyed on absolute paths that
# break when the data root moves (PITFALLS.md). Units are idempotent, so retries are safe.
@task(name="unit", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
def run_unit(fn: Callable[[Any], Any], unit: Any) -> Any:
    return fn(unit)


def prefect_runner(
    fn: Callable[[Any], Any], units: Sequence[Any], *, workers: int, name: Callable[[Any], str] = str
) -> Iterator[tuple[Any, Any]]:
    in_flight: dict[PrefectFuture, Any] = {}
    queue = list(units)
    while queue or in_flight:
        while queue and len(in_flight) < max(1, workers):
            unit = queue.pop(0)
            in_flight[run_unit.with_options(task_run_name=name(unit)).submit(fn, unit)] = unit
        fut = next(as_completed(list(in_flight)))
        unit = in_flight.pop(fut)
        try:
            yield unit, fut.result()
        except Exception as e:  # noqa: BLE001 - the stage records it; other units go on
            yield unit, e
