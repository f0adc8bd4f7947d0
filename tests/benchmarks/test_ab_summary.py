"""The A/B summary divides each variant by the base's mean and counts runs at the target, from real run files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import ab_summary


def _run(tmp: Path, name: str, crops_s: float) -> Path:
    p = tmp / f"{name}.json"
    p.write_text(json.dumps({"args": {"name": name}, "gpu": "test GPU",
                             "pipeline": {"crops_s": crops_s, "threads": {"prepare_wall_s": 5.0}}}))
    return p


def test_summary_ratios_and_result_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [_run(tmp_path, "ab-new-1", 11_000), _run(tmp_path, "ab-base-1", 9_000), _run(tmp_path, "ab-new-2", 12_000),
            _run(tmp_path, "ab-base-2", 11_000)]
    assert ab_summary.main([*map(str, runs), "--name", "s", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert list(summary["variants"]) == ["base", "new"]  # the base first, whatever the file order
    new = summary["variants"]["new"]
    assert (new["mean"], new["min"], new["runs_at_target"], new["ratio_vs_base"]) == (11_500, 11_000, 2, 1.15)
    assert summary["variants"]["base"]["runs_at_target"] == 1
    assert (tmp_path / "s.png").stat().st_size > 10_000
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == ("RESULT s base_mean=10000 base_min=9000 base_at_target=1/2 new_mean=11500 new_min=11000 "
                    "new_at_target=2/2 ratio_new_vs_base=1.15")


def test_a_run_without_variant_and_round_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not end in -<variant>-<round>"):
        ab_summary.main([str(_run(tmp_path, "nameless", 1.0)), "--name", "s", "--out", str(tmp_path)])
