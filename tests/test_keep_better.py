"""The choice between the converted and the healed student (end to end: tests/test_distill_cli.py)."""

import math

from train.keep_better import decide, keep_better, message


def test_keep_better_keeps_the_lower_perplexity():
    assert keep_better(10.0, 9.5) == "healed"
    assert keep_better(10.0, 10.0) == "healed"  # a tie: the healed student is what the run was for
    assert keep_better(10.0, 10.5) == "converted"
    assert keep_better(10.0, math.nan) == "converted"
    assert keep_better(10.0, math.inf) == "converted"
    assert keep_better(math.nan, 10.5) == "healed"
    assert keep_better(10.0, 10.5, keep_healed=True) == "healed"


def test_decide_records_both_students_and_says_when_the_conversion_is_kept():
    record = decide({"ppl": 10.0, "kl": 0.001, "tokens": 9}, {"ppl": 10.5, "kl": 0.004, "tokens": 9})
    assert record == {
        "kept": "converted",
        "keep_healed": False,
        "converted_ppl": 10.0,
        "healed_ppl": 10.5,
        "converted_kl": 0.001,
        "healed_kl": 0.004,
    }
    assert "10.0000 converted vs 10.5000 healed" in message(record)
    assert message(decide({"ppl": 10.0}, {"ppl": 9.0})) is None
    assert decide({"ppl": 10.0}, {"ppl": 10.5}, keep_healed=True)["kept"] == "healed"
