"""The newer image-only methods (issue 35, item 6), each against a hand computation and in a short train() run; and
that a run recorded before a TrainConfig field existed still resumes and is still reused."""
from dataclasses import asdict, replace

import pytest
import torch

from infusing_kit.train import TrainConfig
from infusing_kit.trainconfig import with_defaults
from test_methods import CFG


# ---------------------------------------------------------------------------- runs recorded before a field existed
def test_a_run_recorded_before_a_field_existed_still_resumes_and_is_still_reused(tmp_path):
    # a run recorded by an older kit lacks the fields added since (here two existing ones stand in for them): it
    # trained with them at their default, off, so it is the same configuration; with one switched on it is not
    from infusing_kit.checkpoints import RunFolder
    added = ("ldifs", "adaptive_ema")
    ours = asdict(replace(CFG, l2sp=1.0))
    old = {k: v for k, v in ours.items() if k not in added}
    assert with_defaults(old) == ours
    assert with_defaults(old) != asdict(replace(CFG, l2sp=1.0, ldifs=1.0, sampler="round_robin"))
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"visual": {}, "head": {}, "identity": {"model": "x", "config": old}}, run / "last.pt")
    defaults = asdict(TrainConfig())

    def restore(config, **kw):
        folder = RunFolder(run, resume=True)
        try:
            return folder.restore({"model": "x", "config": config}, **kw)
        finally:
            folder.close()
    assert restore(ours, config_defaults=defaults) is not None
    with pytest.raises(ValueError, match="another TrainConfig"):
        restore({**ours, "ldifs": 1.0}, config_defaults=defaults)
    with pytest.raises(ValueError, match="another TrainConfig"):  # without the defaults the missing keys differ
        restore(ours)
