"""dinoscale: DINOv2/DINOv3-style self-supervised vision pretraining, from uncurated images to checkpoints."""
__version__ = "0.1.0"
