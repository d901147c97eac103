"""The text tower with a dynamic sequence axis, and the prompts that prove it at several lengths.

Class names are a few tokens long, yet open_clip pads every prompt to the full context (77).
An OpenAI-style tower (a causal mask, pooling at the end-of-text token) lets no token see the
padding after it, so feeding only the batch's longest prompt gives the same features at a
fraction of the work. open_clip's ``encode_text`` adds the whole positional embedding and
the whole causal mask, which fixes the axis at 77; the graph exported here is the same
computation with both sliced to the input's length: the engine's own feature computation
(``forgetpack.engine.features.TowerRunner``) followed by the projection. HF towers compute
their own attention mask from the pad id, so their graph only needs the axis declared dynamic.

A tower whose result does depend on the padding (a bidirectional tower without a pad mask,
'last' pooling, a CoCa CLS token) keeps a fixed axis: ``sequence_kind`` says which.
torch and open_clip are imported inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from forgetpack.engine.features import TowerRunner
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.manifest_schema import SEQUENCE_AXIS

if TYPE_CHECKING:
    import torch

DYNAMIC_AXIS = SEQUENCE_AXIS  # the manifest's name of a dynamic text axis (``Tower.input_shape[1]``)
# Prompts of several token lengths (the empty prompt, a class name, a sentence, one past the
# context) for the export-time parity check.
PARITY_PROMPTS = (
    "",
    "cat",
    "a photo of a tabby cat.",
    "a blurry close-up photo of the small grey tabby cat sleeping on a red wool blanket by the window in winter.",
    " ".join(["a very long description of a kitten"] * 14),
)


def _text_tower(model: Any) -> Any:
    """The module holding an OpenAI-style tower's parts: the model itself (CLIP) or ``model.text``."""
    text = getattr(model, "text", None)
    return text if type(text).__name__ == "TextTransformer" else model


def sequence_kind(model: Any) -> str | None:
    """``"openai"`` (slice inside the graph), ``"hf"`` (the tower masks padding itself) or None
    (fixed axis): the engine's rule for cutting the context (``TowerRunner.can_cut``)."""
    try:
        runner = TowerRunner(model)
    except ForgetpackError:  # a tower the engine cannot cut (CoCa, 'last' pooling, ...)
        return None
    return runner.kind if runner.can_cut else None


def max_sequence(model: Any) -> int:
    """The longest input the tower's positions allow: the dynamic axis's upper bound."""
    text = getattr(model, "text", None)
    if type(text).__name__ == "HFTextEncoder":
        return int(text.config.max_position_embeddings)
    return int(_text_tower(model).positional_embedding.shape[0])


def token_lengths(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Tokens each prompt needs, up to and including the token it is pooled at (or its last non-pad token)."""
    return TowerRunner(model).lengths(ids)


def text_encoder(model: Any) -> torch.nn.Module:
    """The module exported as the text graph: for OpenAI-style towers the engine's own feature
    computation (``TowerRunner``: positional embedding and causal mask cut to the input's
    length) followed by the projection; for the others, ``encode_text``."""
    import torch

    runner = TowerRunner(model) if sequence_kind(model) == "openai" else None
    nested = _text_tower(model) is not model

    class EncodeText(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model  # parameter names stay ``model.<state-dict name>``

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            if runner is None:
                return self.model.encode_text(ids)
            pooled = runner(ids)
            proj = (self.model.text if nested else self.model).text_projection  # reached through self: keeps its name
            return proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj

    return EncodeText().eval()


def parity_cases(loaded: Any) -> list[tuple[Any, Any]]:
    """(graph input cut to its longest prompt, full-context input for open_clip) pairs of several lengths:
    each prompt alone, and all of them in one batch."""
    full = loaded.tokenizer(list(PARITY_PROMPTS))
    lengths = token_lengths(loaded.model, full)
    cases = [(full[i : i + 1, : int(lengths[i])], full[i : i + 1]) for i in range(len(full))]
    cases.append((full[:, : int(lengths.max())], full))
    return cases
