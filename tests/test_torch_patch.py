"""Patching a torch model in memory gives exactly the matrices ``forgetpack apply`` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from patch_factory import make_patch, write_base
from safetensors.numpy import load_file

from forgetpack.engine.torch_patch import apply_patches, read_matrices
from forgetpack.format.checkpoint import apply_to_file
from forgetpack.format.errors import PatchError
from forgetpack.format.patch import fingerprint

torch = pytest.importorskip("torch")


class Tiny(torch.nn.Module):
    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.text_projection = torch.nn.Parameter(torch.from_numpy(tensors["text_projection"].copy()))
        self.visual = torch.nn.Module()
        self.visual.proj = torch.nn.Parameter(torch.from_numpy(tensors["visual.proj"].copy()))


def test_in_memory_equals_file(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base.safetensors")
    patches = [make_patch(base, 1), make_patch(base, 2, targets=("text_projection", "visual.proj"))]
    apply_to_file(tmp_path / "base.safetensors", patches, tmp_path / "out.safetensors")
    on_disk = load_file(tmp_path / "out.safetensors")
    model = Tiny(base)
    fps = apply_patches(model, patches)
    np.testing.assert_array_equal(model.text_projection.detach().numpy(), on_disk["text_projection"])
    np.testing.assert_array_equal(model.visual.proj.detach().numpy(), on_disk["visual.proj"])
    assert fps == {n: fingerprint(m) for n, m in read_matrices(model, ["text_projection", "visual.proj"]).items()}


def test_wrong_base_is_refused(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base.safetensors")
    other = write_base(tmp_path / "other.safetensors", seed=3)
    model = Tiny(other)
    with pytest.raises(PatchError, match="different base"):
        apply_patches(model, [make_patch(base, 1)])
    np.testing.assert_array_equal(model.text_projection.detach().numpy(), other["text_projection"])
