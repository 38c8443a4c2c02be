"""What a test's code compiled, and when: JAX's compile log read through pytest's `caplog`."""

import contextlib
import logging

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
