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


@pytest.mark.parametrize("key, value", [("ransac_max_error", "abc"), ("ba", 3), ("triangulation_matching", 2),
                                        ("ba.window", 2.5), ("init_local_ratio", "abc"),
                                        ("max_descriptor_distance", True)])
def test_values_of_the_wrong_kind_are_named(key, value):
    with pytest.raises(ValueError, match=f"option '{key}' (takes a value like|is a group)"):
        with_overrides(TrackerConfig(), {key: value})


def test_optional_fields_take_a_number_and_floats_take_whole_numbers():
    config = with_overrides(TrackerConfig(), parse_overrides(["max_descriptor_distance=0.7", "ransac_max_error=2"]))
    assert config.max_descriptor_distance == 0.7 and config.ransac_max_error == 2


def test_optional_fields_can_be_switched_off_again():
    config = with_overrides(TrackerConfig(), parse_overrides(["init_local_ratio=0.9"]))
    assert config.init_local_ratio == 0.9
    assert with_overrides(config, parse_overrides(["init_local_ratio=null"])).init_local_ratio is None
