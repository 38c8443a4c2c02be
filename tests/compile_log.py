"""What a test's code compiled, and when: JAX's compile log read through pytest's `caplog`."""

import contextlib
import logging
import types

import jax

FINISHED = "Finished XLA compilation of "


def compiled(caplog) -> list[str]:
    """The computations compiled so far ("jit(prefill)", ...), in order."""
    return [m.split(" in ")[0].removeprefix(FINISHED) for m in caplog.messages if m.startswith(FINISHED)]


@contextlib.contextmanager
def compiled_at_allocation(caplog, monkeypatch, module):
    """Within: every compilation logged; yields a list to which each call of `module.init_cache` (the
    cache's shapes under `eval_shape` and the arrays alike) appends what had been compiled by then."""
    at_allocation, allocate = [], module.init_cache
    monkeypatch.setattr(
        module, "init_cache", lambda *args: at_allocation.append(compiled(caplog)) or allocate(*args)
    )
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax"):
        yield at_allocation


class _RaisingWhenRun:
    """A compiled executable that raises `error` when called (its plan and text as compiled)."""

    def __init__(self, compiled, error: Exception):
        self.compiled, self.error = compiled, error

    def __getattr__(self, name):
        return getattr(self.compiled, name)

    def __call__(self, *args):
        raise self.error


def raising_when_run(jitted, error: Exception):
    """A stand-in for `jitted` whose `.lower(...).compile()` compiles it as it is and gives an executable
    that raises `error` when run: a step that runs out of memory past its plan."""
    lower = lambda *args: types.SimpleNamespace(
        compile=lambda: _RaisingWhenRun(jitted.lower(*args).compile(), error)
    )
    return types.SimpleNamespace(lower=lower)
