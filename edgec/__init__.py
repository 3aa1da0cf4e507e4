"""edgec: edge-deployment pipeline."""
__version__ = "0.1.0"
