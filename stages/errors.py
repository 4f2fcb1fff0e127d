"""The one error shape stages use for bad input: a short machine code plus a sentence."""

from __future__ import annotations


class StageError(Exception):
    """`code` goes to the catalog's error_code column, `str(err)` (naming the input and the
    cause) to its error column. Survives pickling with its fields, since errors cross process
    boundaries (decoder processes, process pools, Prefect result storage)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # Exception pickles as cls(*args), which would drop `code` and subclass fields.
        return (_rebuild, (type(self), self.__dict__))


def _rebuild(cls: type[StageError], state: dict) -> StageError:
    err = cls.__new__(cls)
    Exception.__init__(err, state.get("message", ""))
    err.__dict__.update(state)
    return err
