"""bench/carry_minilm.py: a model directory to float16 and back keeps everything else."""
import importlib.util
from pathlib import Path

import torch
from conftest import write_tiny_model_dir
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("carry", ROOT / "bench" / "carry_minilm.py")
carry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry)


def test_pack_then_widen_gives_the_weights_rounded_to_float16(tmp_path):
    model = write_tiny_model_dir(tmp_path / "m")
    carry.convert(model, tmp_path / "half", torch.float16)
    carry.convert(tmp_path / "half", tmp_path / "wide", torch.float32)
    before, half, after = (load_file(d / carry.WEIGHTS) for d in
                           (model, tmp_path / "half", tmp_path / "wide"))
    assert before.keys() == after.keys()
    for k, v in before.items():
        if v.is_floating_point():
            assert half[k].dtype == torch.float16 and after[k].dtype == torch.float32
            assert torch.equal(after[k], v.half().float())
        else:
            assert torch.equal(after[k], v)
    assert {f.name for f in (tmp_path / "wide").iterdir()} == {f.name for f in model.iterdir()}
