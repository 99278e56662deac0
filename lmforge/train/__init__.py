"""Training: the one loop (`trainer`) that pretraining, SFT, DPO, reward models and RL plug into.

    from lmforge.train import TrainConfig, train, BatchSource, ListBatches, unwrap

Names resolve lazily from `lmforge.train.trainer`, so importing `lmforge.train` loads no torch.
"""
import importlib

__all__ = ["TrainConfig", "train", "BatchSource", "ListBatches", "DistInfo", "dist_info", "unwrap",
           "lr_factor", "latest_checkpoint", "TrainHooks", "to_device", "plot_metrics", "read_metrics", "enable_activation_checkpointing"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("lmforge.train.trainer"), name)
    raise AttributeError(f"module 'lmforge.train' has no attribute '{name}'")
