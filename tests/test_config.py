"""Command-line options applied to the config dataclasses."""
from __future__ import annotations

import pytest

from vo.config import parse_overrides, with_overrides
from vo.tracker import TrackerConfig


def test_overrides_reach_nested_fields_and_leave_the_original_alone():
    base = TrackerConfig()
    config = with_overrides(base, parse_overrides(["triangulation_min_baseline_depth_ratio=0.05", "ba.window=10",
                                                   "triangulation_matching=matcher"]))
    assert config.triangulation_min_baseline_depth_ratio == 0.05 and config.ba.window == 10
    assert config.triangulation_matching == "matcher"
    default = TrackerConfig()
    assert base.ba.window == default.ba.window
    assert base.triangulation_min_baseline_depth_ratio == default.triangulation_min_baseline_depth_ratio


@pytest.mark.parametrize("key", ["triangulation_min_baseline_ratio", "ba.windw", "seed.x"])
def test_unknown_options_are_named(key):
    with pytest.raises(ValueError, match=f"unknown option '{key}'"):
        with_overrides(TrackerConfig(), {key: 1})
