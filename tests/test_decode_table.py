"""eval.bench.decode_table: the README's decode table from the benchmark's results, cut short or finished."""

import pytest

from eval.bench.decode_table import main, table


def _row(model, batch, context, ms=None, floor=1.0, **fields):
    row = {"model": model, "batch": batch, "context": context, "decode_kernels": True, "floor_ms": floor}
    return row | ({"loop_step_ms": ms} if ms else {"skipped": "cache 99 GB does not fit"}) | fields


PEER = {"model": "GptOssForCausalLM", "transformers": "5.0", "batch": 1, "context": 4096}


def test_table_joins_runs_of_one_card_and_names_the_peer():
    """Points from a run cut short (its rows so far, the peer first) and a finished one in one table: rows
    by batch then context, the fastest in bold (times that print alike both), a model a point skipped "-",
    a point no model ran left out, the jnp path's rows and models not tabled ignored, each peer's step
    against GQA's loop of its own run."""
    small = {
        "device": "H",
        "complete": False,
        "rows_so_far": [
            {"transformers_rows": [PEER | {"step_ms": 30.0}]},
            _row("gqa", 1, 4096, 3.0, 1.3),
            _row("gqa", 1, 4096, 9.0, decode_kernels=False),  # the jnp path: not tabled
            _row("mla", 1, 4096, 2.5, 1.2),
            _row("mla_partial", 1, 4096, 2.501, 1.25),
        ],
    }
    wide = {"device": "H", "transformers_rows": [PEER | {"step_ms": 40.0}], "rows": [
        _row("gqa", 64, 131072), _row("mla", 64, 131072, 40.0), _row("mla_partial", 64, 131072, 20.0),
        _row("mla_rorope", 64, 131072, 19.0),  # not a column of the table
        _row("gqa", 256, 131072), _row("mla", 256, 131072),  # no model ran: no row
    ]}  # fmt: skip
    assert table({"small.json": small, "wide.json": wide}).splitlines() == [
        "| batch x context | GQA | MLA default | MLA partial | floor GQA / MLA default / MLA partial |",
        "|---|---|---|---|---|",
        "| 1 x 4K | 3.00 | **2.50** | **2.50** | 1.30 / 1.20 / 1.25 |",
        "| 64 x 128K | - | 40.00 | **20.00** | 1.00 / 1.00 / 1.00 |",
        "",
        "GptOssForCausalLM, transformers 5.0: 30.0 ms a step at 1 x 4K, 10.0x GQA's loop in that run",
        "",
        "GptOssForCausalLM, transformers 5.0: 40.0 ms a step at 1 x 4K (no GQA point in its run)",
    ]


def test_table_refuses_what_does_not_make_one_table(tmp_path, capsys):
    """Mixed cards, a file naming none, a point measured twice (two files, or a swept setting), a point timed
    without the loop, no points; unreadable files and rows without a point's fields by name."""
    one = {"device": "H100", "rows": [_row("gqa", 1, 4096, 3.0)]}
    with pytest.raises(ValueError, match="more than one card"):
        table({"a": one, "b": one | {"device": "H200"}})
    with pytest.raises(ValueError, match="name no card"):
        table({"a": one, "b": {"rows": []}})
    with pytest.raises(ValueError, match="gqa at 1 x 4096 twice, in a and b"):
        table({"a": one, "b": one})
    swept = {"device": "H100", "rows": [_row("gqa", 1, 4096, 3.0, wide_kernel=w) for w in ("on", "off")]}
    with pytest.raises(ValueError, match="twice, in a and a"):
        table({"a": swept})
    per_call = {
        "device": "H100",
        "rows": [{k: v for k, v in _row("gqa", 1, 4096, 3.0).items()} | {"step_ms": 3}],
    }
    del per_call["rows"][0]["loop_step_ms"]
    with pytest.raises(ValueError, match="not timed in the device loop"):
        table({"a": per_call})
    with pytest.raises(ValueError, match="no decode points"):
        table({"a": {"device": "H100", "rows": [_row("gqa", 1, 4096)]}})
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(SystemExit):
        main([str(broken)])
    assert "broken.json" in capsys.readouterr().err
    no_floor = tmp_path / "no_floor.json"
    no_floor.write_text('{"device": "H100", "rows": [{"model": "gqa", "decode_kernels": true, "batch": 1}]}')
    with pytest.raises(SystemExit):
        main([str(no_floor)])
    assert "context" in capsys.readouterr().err
