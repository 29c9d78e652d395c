"""Checkpoint I/O: validated, streaming reads and atomic sharded writes of HF safetensors."""

from safegene_fast.io.reader import Checkpoint, CheckpointError, TensorInfo, check_same_layout
from safegene_fast.io.writer import Planned, ShardedWriter, plan_shards

__all__ = ["Checkpoint", "CheckpointError", "Planned", "ShardedWriter", "TensorInfo", "check_same_layout",
           "plan_shards"]
