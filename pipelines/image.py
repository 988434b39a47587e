"""The components' container image, in one place, and the factory that applies it.

Every KFP component is built from its plain Python function by :func:`build_component`,
so ``python -m pipelines.compile --image URI`` can set the image without editing code.
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl

__all__ = ["COMPONENT_IMAGE", "build_component"]

# The image holds this project installed (``components``, ``retrain``, ``pipelines``) and
# kfp, so tasks skip ``pip install kfp`` (install_kfp_package=False).
COMPONENT_IMAGE = "retrain-components:latest"


def build_component(func: Callable[..., Any], image: str = COMPONENT_IMAGE) -> Any:
    """A KFP component running ``func`` in ``image``; kfp ships only ``func``'s source."""
    return dsl.component(func=func, base_image=image, install_kfp_package=False)
