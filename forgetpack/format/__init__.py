"""The patch format layer: torch-free, numpy + safetensors (+ cryptography for signatures).

Everything a serving machine needs to trust a patch lives here: the patch file itself
(``patch``), safe file and folder output (``fileio``), signatures (``signing``), checkpoint
apply/revert (``checkpoint``), the one "does this patch fit?" check (``fit``), the export
manifest the runtime reads (``manifest``, ``onnxfile``), and the rules every name, label and
template gets (``names``). Nothing here imports another part of forgetpack.
"""
