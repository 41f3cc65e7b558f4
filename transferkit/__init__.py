"""transferkit: transfer learning from pretrained CNNs."""

__version__ = "0.1.0"
