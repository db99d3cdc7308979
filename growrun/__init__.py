"""growrun: an experiment runner for growing neural networks (TINY, GradMax, baselines) on CIFAR."""

__version__ = "0.1.0"
