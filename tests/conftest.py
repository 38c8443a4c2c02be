"""Shared fixtures: tiny transformers gpt-oss models with random weights, saved with save_pretrained."""

from __future__ import annotations

import os
import tempfile
import threading

# Eight simulated CPU devices for the sharding tests. LLVM at -O0: most of the suite's time is XLA compiling
# small programs that then run once, and -O0 halves the compile time; results move by rounding only (every
# tolerance here is set by float32 arithmetic, not by one code generator's rounding).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
# Many tests compile the same tiny models, in both test workers and in the subprocesses of the CLI tests:
# they share compiled programs through JAX's persistent cache (set before JAX is imported, and inherited).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gptoss-mla-jax-test-jit")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import numpy as np
import pytest

# float32 parity needs full-precision matmuls (the default may use bf16 passes on accelerators).
jax.config.update("jax_default_matmul_precision", "highest")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=4,
    max_position_embeddings=256,
)


def pytest_collection_modifyitems(items):
    """The tests marked slow run first: spread over workers (pytest-xdist, one test handed out at a time:
    `--maxschedchunk=1` in pyproject.toml), a long test started last would keep one worker busy after the
    others are done."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise file order


def randomize_(model, seed: int) -> None:
    """Overwrite every parameter with random values large enough to matter: nonzero biases and sinks,
    norm weights away from one, expert activations that reach the SwiGLU clamps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                value = 1 + 0.2 * noise
            elif "sinks" in name:
                value = noise
            elif "experts" in name:
                value = 0.5 * noise
            elif "embed" in name:
                value = noise
            else:
                value = 0.25 * noise
            p.copy_(value.to(p.dtype))


def make_hf_model(folder, seed: int = 0, max_shard_size=None, **overrides):
    """A random GptOssForCausalLM (eager attention, float32) saved to `folder`; returns the torch model."""
    config = transformers.GptOssConfig(**{**TINY, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(config).eval()
    randomize_(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


def hf_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(torch model, folder) of the default tiny config, shared by the whole session."""
    folder = tmp_path_factory.mktemp("tiny_hf")
    return make_hf_model(folder), str(folder)


@pytest.fixture(scope="session")
def tiny2_hf(tmp_path_factory):
    """(torch model, folder) of the tiny config cut to two layers, one sliding and one full: for tests that
    compile a model many times (training, kernels) and need one layer of each kind, not four."""
    folder = tmp_path_factory.mktemp("tiny2_hf")
    return make_hf_model(folder, num_hidden_layers=2), str(folder)


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    """(config, params) of `tiny_hf` loaded by our loader, float32: one load per test module."""
    from weights.safetensors_io import load_hf

    return load_hf(tiny_hf[1], progress=False)


@pytest.fixture(scope="module")
def calib(tiny):
    """Calibration windows for converting `tiny` to MLA: 4 x 32 random tokens."""
    config, _ = tiny
    return np.random.default_rng(7).integers(0, config.vocab_size, (4, 32))


class _NumpyThreadIds:
    """jax.numpy for JAX's thread_map, but int32 NumPy's (`warpgroups_compiled_once`)."""

    int32 = np.int32

    def __getattr__(self, name):
        import jax.numpy as jnp

        return getattr(jnp, name)


@pytest.fixture
def warpgroups_compiled_once(monkeypatch):
    """The interpreter runs a program of several warpgroups as threads, each of which compiles the kernel's
    body anew for every program of the grid (JAX 0.10's `thread_map._run_jaxpr`; host callbacks keep it
    out of the persistent cache); here each body compiles once and every thread runs it.
    Where that private function is gone the tests run as they are, only slower. The threads' ids are made
    NumPy scalars: a jnp scalar made inside the host callback that starts the threads dispatches an XLA
    computation from within a running one, which can deadlock the CPU client (seen under load on 2 cores)."""
    from jax._src.pallas.mosaic.interpret import thread_map

    if not hasattr(thread_map, "_run_jaxpr"):
        return
    monkeypatch.setattr(thread_map, "jnp", _NumpyThreadIds())
    compiled, lock = {}, threading.Lock()

    def run(jaxpr, consts, *args):
        key = (id(jaxpr), *((np.shape(x), x.dtype) for x in jax.tree.leaves((consts, args))))
        with lock:  # the threads run concurrently after it: they wait on each other's barriers
            if key not in compiled:
                body = jax.jit(lambda consts, *args: jax.core.eval_jaxpr(jaxpr, consts, *args))
                compiled[key] = jaxpr, body.trace(consts, *args).lower().compile()  # the jaxpr keeps its id
        compiled[key][1](consts, *args)

    monkeypatch.setattr(thread_map, "_run_jaxpr", run)
