"""Device and precision choice."""

import pytest
import torch

from simclr_cli import runtime
from simclr_cli.runtime import RuntimeSetupError, pick_device, resolve_precision


@pytest.mark.parametrize("flags,expected", [({"avx2"}, "fp32"), ({"avx2", "amx_bf16"}, "bf16"),
                                            ({"avx512_bf16"}, "bf16")])
def test_auto_precision_on_cpu_follows_the_bf16_instructions(monkeypatch, flags, expected):
    monkeypatch.delenv(runtime.PRECISION_ENV, raising=False)  # the hardware decides, not a forced run
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_bad_device_and_precision_are_one_line_errors():
    with pytest.raises(RuntimeSetupError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    with pytest.raises(RuntimeSetupError, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", torch.device("cpu"))
