"""facegender: train, evaluate and use a ResNet18 face gender classifier."""
__version__ = "0.1.0"
