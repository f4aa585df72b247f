"""align: a comparative alignment toolkit (SFT, reward modelling, RLHF-PPO), one staged pipeline."""

__version__ = "0.1.0"
