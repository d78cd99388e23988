import logging
import re

import pytest

from tests.conftest import QUICKSTART, quick_config
from workers.core.config import apply_overrides, dump_config, load_config, parse_config
from workers.core.errors import ConfigError


def test_quickstart_loads_with_the_documented_defaults():
    cfg = load_config(QUICKSTART)
    assert cfg.name == "quickstart" and cfg.peers == 4 and cfg.data.dataset == "digits"
    assert cfg.gossip.method == "gossip" and cfg.gossip.every_steps == "epoch"
    defaults = parse_config({}).gossip
    assert (defaults.group_size, defaults.min_group_size, defaults.alpha, defaults.matchmaking_time) == (
        16,
        2,
        1.0,
        5.0,
    )


def test_overrides_are_typed_and_nested():
    cfg = load_config(QUICKSTART, ["gossip.alpha=0.5", "gossip.every_steps=5", "peers=3", "optim.lr=1e-3"])
    assert cfg.gossip.alpha == 0.5 and cfg.gossip.every_steps == 5 and cfg.peers == 3 and cfg.optim.lr == 0.001


def test_overrides_do_not_mutate_the_input():
    raw = {"gossip": {"alpha": 1.0}}
    assert apply_overrides(raw, ["gossip.alpha=0.1"]) == {"gossip": {"alpha": 0.1}}
    assert raw == {"gossip": {"alpha": 1.0}}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("gossip.alpha=1.5", "gossip.alpha=1.5: "),
        ("gossip.alpha=0", "gossip.alpha=0: "),
        ("gossip.group_size=0", "gossip.group_size=0: "),
        ("gossip.matchmaking_time=-1", "gossip.matchmaking_time=-1: "),
        ("gossip.every_steps=0", "gossip.every_steps=0: "),
        ("gossip.method=ring", "gossip.method='ring': "),
        ("optim.epochs=0", "optim.epochs=0: "),
        ("peers=0", "peers=0: "),
        ("gossip.typo=3", "gossip.typo: unknown key (value 3)"),
        ("colour=blue", "colour: unknown key (value 'blue')"),
    ],
)
def test_bad_values_name_the_field_and_the_value(override, expected):
    """`field=value: reason`, together: a 0 alone would also be found in "greater than 0"."""
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert expected in str(err.value)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="min_group_size=8 is larger than group_size=4"):
        load_config(QUICKSTART, ["gossip.group_size=4", "gossip.min_group_size=8"])
    with pytest.raises(ConfigError, match="min_group_size=5 can never be met by peers=4"):
        load_config(QUICKSTART, ["gossip.min_group_size=5"])
    load_config(QUICKSTART, ["gossip.min_group_size=5", "gossip.method=none"])  # no groups, no constraint


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(QUICKSTART, ["gossip.alpha"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_snapshot_round_trips(tmp_path):
    cfg = load_config(QUICKSTART, ["gossip.every_steps=7"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_an_optimizer_target_batch_the_run_never_reaches_is_rejected():
    with pytest.raises(ConfigError, match=r"gossip.target_batch_size=100000 is never reached: .* about 14380 samples"):
        quick_config("gossip.method=optimizer", "optim.epochs=10", "gossip.target_batch_size=100000")
    assert quick_config("gossip.method=optimizer", "gossip.target_batch_size=256").gossip.target_batch_size == 256


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["gossip.method=optimizer", "gossip.every_steps=5"], "gossip.method='optimizer' ignores gossip.every_steps=5"),
        (["gossip.method=optimizer", "gossip.allreduce_on=gradients"], "ignores gossip.allreduce_on='gradients'"),
        (["gossip.target_batch_size=256"], "gossip.method='gossip' ignores gossip.target_batch_size=256"),
        (["gossip.method=allreduce", "gossip.target_batch_size=256"], "ignores gossip.target_batch_size=256"),
        (["gossip.background_averaging=true"], "gossip.method='gossip' ignores gossip.background_averaging=True"),
        (["gossip.method=allreduce", "gossip.allreduce_on=gradients", "gossip.every_steps=4"],
         "ignores gossip.every_steps=4 (gradients are averaged at every step)"),
    ],
)  # fmt: skip
def test_knobs_the_method_ignores_are_rejected_naming_them(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        quick_config(*overrides)


def test_the_no_communication_baseline_accepts_any_knob():
    """`none` ignores every knob by design: a sweep over the method compares it with any setting of the others."""
    cfg = quick_config("gossip.method=none", "gossip.every_steps=5", "gossip.target_batch_size=256")
    assert cfg.gossip.every_steps == 5


def test_every_steps_beyond_the_whole_run_is_rejected():
    # digits: 1438 training samples / 4 peers / batch 32 -> 12 steps per epoch, 36 in 3 epochs
    assert quick_config("gossip.every_steps=36").gossip.every_steps == 36  # one round, in the last step
    message = "gossip.every_steps=37 is never reached: each peer takes about 12 steps per epoch"
    with pytest.raises(ConfigError, match=re.escape(message) + r".* 36 in optim.epochs=3"):
        quick_config("gossip.every_steps=37")
    with pytest.raises(ConfigError, match="gossip.every_steps=37 is never reached"):
        quick_config("gossip.method=allreduce", "gossip.every_steps=37")


def test_min_group_size_of_every_peer_is_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="workers.core.config"):
        quick_config("gossip.min_group_size=4")
    assert "gossip.min_group_size=4 = peers: every round needs every peer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="workers.core.config"):
        quick_config("peers=2")  # two peers cannot have a smaller group: nothing to warn about
        quick_config("gossip.min_group_size=3")
    assert caplog.text == ""
