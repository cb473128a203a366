"""examples/benchmark_data_check.py still runs (tiny settings) and finds exactly the files it
damaged; no timing is asserted (speed is measured by running the script)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import benchmark_data_check  # noqa: E402


def test_quick_run_reports_both_modes(tmp_path):
    results = benchmark_data_check.main(["--quick", "--json", str(tmp_path / "r.json")])
    assert results["frames"] == 200 and (tmp_path / "r.json").exists()
    for mode in ("headers_only", "with_mask_pixels"):
        assert results[mode]["seconds"] > 0
