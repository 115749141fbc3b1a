"""Multi-student distillation (DINOv3): a frozen teacher into a family of smaller ViTs in one job."""
