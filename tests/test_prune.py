"""Channel pruning of SuperPoint (vo.train prune)."""
from __future__ import annotations

import pytest
import torch

from models.superpoint import SuperPointNet, channels_from_state_dict
from vo.train.__main__ import main
from vo.train.prune import prune_channels


def test_pruning_the_channels_nothing_reads_keeps_the_outputs():
    torch.manual_seed(0)
    net = SuperPointNet(channels=(8, 8, 16, 16, 32)).eval()
    with torch.no_grad():                     # conv1a's and conv1b's last 3 outputs are read with weight 0
        net.conv1b.weight[:, 5:] = 0
        net.conv2a.weight[:, 5:] = 0
        net.conv2a.weight[:, 0] *= 10         # and the rest with weights of any size
    pruned = SuperPointNet(channels=(5, 8, 16, 16, 32)).eval()
    pruned.load_state_dict(prune_channels(net.state_dict(), (5, 8, 16, 16, 32)))
    image = torch.rand(1, 1, 32, 48)
    with torch.no_grad():
        for full, narrow in zip(net(image), pruned(image)):
            torch.testing.assert_close(narrow, full)


def test_pruning_keeps_the_official_layout_at_the_new_widths():
    state = SuperPointNet(channels=(8, 8, 16, 16, 32)).state_dict()
    pruned = prune_channels(state, (4, 6, 12, 10, 20))
    assert channels_from_state_dict(pruned) == (4, 6, 12, 10, 20)
    assert pruned.keys() == state.keys()
    assert pruned["convDb.weight"].shape == (256, 20, 1, 1) and pruned["convPb.weight"].shape == (65, 20, 1, 1)


def test_prune_refuses_widths_above_the_networks_in_one_line(tmp_path, capsys):
    weights = tmp_path / "sp.pth"
    torch.save(SuperPointNet(channels=(8, 8, 16, 16, 32)).state_dict(), weights)
    assert main(["prune", str(weights), "--channels", "16", "8", "16", "16", "32", "--out", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(16, 8, 16, 16, 32)" in err and "(8, 8, 16, 16, 32)" in err
    assert main(["prune", str(weights), "--channels", "4", "8", "16", "16", "32", "--out", str(tmp_path / "o.pth")]) == 0
    assert channels_from_state_dict(torch.load(tmp_path / "o.pth")) == (4, 8, 16, 16, 32)


@pytest.mark.parametrize("channels", [(0, 8, 16, 16, 32), (8, 8, 16, 16)])
def test_prune_channels_checks_its_widths(channels):
    with pytest.raises(ValueError, match="must be 5 widths"):
        prune_channels(SuperPointNet(channels=(8, 8, 16, 16, 32)).state_dict(), channels)
