"""The learning-rate range test: ``SafeTrainer.find_lr``."""
