"""Model specs and the projection registry."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from forgetpack.engine.models import load_model
from forgetpack.engine.projections import find_projection, projection_matrix
from forgetpack.format.errors import ForgetpackError


@pytest.fixture(scope="module")
def rn50():
    return load_model("RN50:none")


@pytest.fixture(scope="module")
def vit():
    return load_model("ViT-B-32:none")


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def assert_same_weights(a, b) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].tobytes() == sb[k].tobytes(), k


# ---------------------------------------------------------------------------- specs


@pytest.mark.parametrize("spec,message", [
    ("", "empty model spec"),
    ("ViT-B-32", "unknown model spec 'ViT-B-32'; accepted: 'mini'"),
    ("Nope-1:none", "unknown architecture 'Nope-1'"),
    ("vit-b-32:none", "did you mean ViT-B-32"),
    ("ViT-B-32:", "lacks weights"),
    ("ViT-B-32:nosuchtag", "neither a pretrained tag of ViT-B-32"),
    ("ViT-B-32:/no/such/dir/x.pt", "does not exist"),
    ("hf-hub:", "names no repository"),
])  # fmt: skip
def test_bad_specs_are_one_clear_line(spec: str, message: str) -> None:
    with pytest.raises(ForgetpackError, match=message) as info:
        load_model(spec)
    assert "\n" not in str(info.value)


def test_pretrained_tag_offline_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ForgetpackError, match=r"cannot load ViT-B-32:openai: .*offline") as info:
        load_model("ViT-B-32:openai")
    assert "\n" not in str(info.value)
    with pytest.raises(ForgetpackError, match="cannot load hf-hub:org/not-cached"):
        load_model("hf-hub:org/not-cached")


def test_random_init_is_fixed_and_leaves_the_global_rng_alone(rn50) -> None:
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    again = load_model("RN50:none")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert_same_weights(rn50.model, again.model)
    assert again.model_id == "RN50:none" and again.arch == "RN50"
    assert not again.model.training


def test_local_checkpoints(rn50, tmp_path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in rn50.model.state_dict().items()}
    st = tmp_path / "rn50.safetensors"
    save_file(state, str(st))
    loaded = load_model(f"RN50:{st}")
    assert_same_weights(rn50.model, loaded.model)
    assert loaded.model_id == f"RN50:{st.resolve()}"

    pt = tmp_path / "rn50.pt"
    torch.save(state, pt)
    assert_same_weights(rn50.model, load_model(f"RN50:{pt}").model)

    with pytest.raises(ForgetpackError, match="cannot load checkpoint .* as ViT-B-32"):
        load_model(f"ViT-B-32:{st}")
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(ForgetpackError, match="unsupported checkpoint type"):
        load_model(f"RN50:{text}")


class _Evil:
    """Unpickling this would create a marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": _Evil(str(marker))}, evil)
    with pytest.raises(ForgetpackError, match="cannot load checkpoint"):
        load_model(f"RN50:{evil}")
    assert not marker.exists()


def test_mini_loads_when_shipped() -> None:
    from forgetpack import mini

    if not mini.WEIGHTS_PATH.is_file():
        pytest.skip("mini weights not trained yet")
    loaded = load_model("mini")
    assert loaded.model_id == "mini" and loaded.arch == mini.MINI_ARCH
    assert find_projection(loaded.model, "text").target == "text.proj.weight"


# ---------------------------------------------------------------------------- projections


def test_projection_registry_on_open_clip_towers(vit, rn50) -> None:
    text = find_projection(vit.model, "text")
    assert (text.target, text.layout, text.rule, text.bias) == ("text_projection", "in_out", "openai-text", None)
    visual = find_projection(vit.model, "image")
    assert (visual.target, visual.layout, visual.rule) == ("visual.proj", "in_out", "vit")
    assert projection_matrix(vit.model, text).shape == (512, 512)

    visual = find_projection(rn50.model, "image")
    assert (visual.target, visual.layout, visual.rule) == ("visual.attnpool.c_proj.weight", "out_in", "modified-resnet")
    assert visual.bias == "visual.attnpool.c_proj.bias"
    W = projection_matrix(rn50.model, visual)
    assert W.shape == (1024, 2048)  # nn.Linear weight [out, in]
    assert visual.feature_form(W).shape == (2048, 1024)


def test_projection_registry_on_an_hf_text_tower() -> None:
    from forgetpack import mini

    model, _, _ = mini.create_untrained()
    proj = find_projection(model, "text")
    assert (proj.target, proj.layout, proj.rule) == ("text.proj.weight", "out_in", "hf-text")
    W = projection_matrix(model, proj)
    x = torch.randn(3, W.shape[1])
    np.testing.assert_allclose(x.numpy() @ proj.feature_form(W), model.text.proj(x).detach().numpy(), rtol=1e-4, atol=1e-5)


class HFTextEncoder(torch.nn.Module):
    """A stand-in with open_clip's HF tower class name and an MLP projection."""

    def __init__(self, proj: torch.nn.Module) -> None:
        super().__init__()
        self.proj = proj


class TimmModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Module()
        self.head.proj = torch.nn.Linear(8, 4)


class _Model(torch.nn.Module):
    def __init__(self, text: torch.nn.Module | None = None, visual: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.text = text
        self.visual = visual


def test_projection_registry_refuses_what_it_cannot_patch() -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False), torch.nn.GELU(), torch.nn.Linear(6, 4, bias=False))
    with pytest.raises(ForgetpackError, match="hf_proj_type 'mlp'"):
        find_projection(_Model(text=HFTextEncoder(mlp)), "text")
    with pytest.raises(ForgetpackError, match="no linear projection"):
        find_projection(_Model(text=HFTextEncoder(torch.nn.Identity())), "text")
    with pytest.raises(ForgetpackError, match="unknown text tower 'GRU'"):
        find_projection(_Model(text=torch.nn.GRU(4, 4)), "text")
    with pytest.raises(ForgetpackError, match="unknown image tower 'Conv2d'"):
        find_projection(_Model(visual=torch.nn.Conv2d(3, 3, 1)), "image")
    timm = find_projection(_Model(visual=TimmModel()), "image")
    assert (timm.target, timm.layout, timm.bias) == ("visual.head.proj.weight", "out_in", "visual.head.proj.bias")
