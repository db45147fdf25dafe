"""Networks of the pdpe-qmri bundle."""

from .pdpenet import PDPENet

__all__ = ["PDPENet"]
