"""forgetpack: make CLIP models forget classes, shipped as small verifiable patches.

Importing this package is cheap and never imports torch: the patch format and the
CLI shell must work on a serving machine that has only numpy and safetensors.
"""

__version__ = "0.1.0"
