"""eval.experiments.mosaic_gpu_probe: the plain wgmma kernel lowers for CUDA and the Mosaic GPU interpreter
reproduces it, so a False for the transposed operand is the interpreter's limit, not a broken probe; and
the keys' spellings that `flash_decode_mosaic` takes instead hold both ways."""

import json

from eval.experiments import mosaic_gpu_probe


def test_probe_reports_both_operands_and_the_keys_spellings(tmp_path):
    out = tmp_path / "probe.json"
    assert mosaic_gpu_probe.main(["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    plain, transposed = result["wgmma"]
    assert plain["operand"] == "plain" and transposed["operand"] == "transposed"
    assert plain["lowers_for_cuda"] and plain["interpreted"] and plain["max_abs_difference"] < 1e-3
    assert transposed["lowers_for_cuda"]
    assert result["port_checkable_in_ci"] == (
        transposed["interpreted"] and transposed["max_abs_difference"] < 1e-3
    )
    store = result["keys"]
    assert store["lowers_for_cuda"] and store["interpreted"] and store["max_abs_difference"] < 1e-3
    assert result["checkable_with_spellings"]
