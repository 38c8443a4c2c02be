"""eval.bench.decode_table: the README's decode table from the benchmark's results, cut short or finished."""

import pytest

from eval.bench.decode_table import main, table


def _row(model, batch, context, ms=None, floor=1.0):
    row = {"model": model, "batch": batch, "context": context, "decode_kernels": True, "floor_ms": floor}
    return row | ({"loop_step_ms": ms} if ms else {"skipped": "cache 99 GB does not fit"})


def test_table_joins_runs_of_one_card_and_names_the_peer():
    """Points from a finished run and one cut short (its rows so far, the peer first) in one table: rows by
    batch then context, the fastest in bold, a model a point skipped or no run measured "-", a point no model
    ran left out, the peer's step against GQA's."""
    peer = {"model": "transformers GptOssForCausalLM", "transformers": "5.0", "batch": 1, "context": 4096}
    small = {
        "device": "H",
        "complete": False,
        "rows_so_far": [
            {"transformers_rows": [peer | {"step_ms": 30.0}]},
            _row("gqa", 1, 4096, 3.0, 1.3),
            _row("mla", 1, 4096, 2.5, 1.2),
            _row("mla_partial", 1, 4096, 2.75, 1.25),
        ],
    }
    wide = {"device": "H", "transformers_rows": [], "rows": [
        _row("gqa", 64, 131072), _row("mla", 64, 131072, 40.0), _row("mla_partial", 64, 131072, 20.0),
        _row("mla_rorope", 64, 131072, 19.0),  # not a column of the table
        _row("gqa", 256, 131072), _row("mla", 256, 131072),  # no model ran: no row
    ]}  # fmt: skip
    assert table({"small.json": small, "wide.json": wide}).splitlines() == [
        "| batch x context | GQA | MLA default | MLA partial | floor GQA / MLA default / MLA partial |",
        "|---|---|---|---|---|",
        "| 1 x 4K | 3.00 | **2.50** | 2.75 | 1.30 / 1.20 / 1.25 |",
        "| 64 x 128K | - | 40.00 | **20.00** | 1.00 / 1.00 / 1.00 |",
        "",
        "transformers GptOssForCausalLM, transformers 5.0: 30.0 ms a step at 1 x 4K, 10.0x GQA's loop",
    ]


def test_table_refuses_mixed_cards_and_files_without_points(tmp_path, capsys):
    one = {"device": "H100", "rows": [_row("gqa", 1, 4096, 3.0)]}
    with pytest.raises(ValueError, match="more than one card"):
        table({"a": one, "b": one | {"device": "H200"}})
    with pytest.raises(ValueError, match="no decode points"):
        table({"a": {"device": "H100", "rows": []}})
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(SystemExit):
        main([str(broken)])
    assert "broken.json" in capsys.readouterr().err
