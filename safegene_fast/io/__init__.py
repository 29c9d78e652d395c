"""Checkpoint I/O: validated, streaming reads and atomic sharded writes of HF safetensors, and the
one atomic write helper every output of the tool goes through."""

from safegene_fast.io.atomic import (OutputBusyError, OutputExistsError, UnsafeOutputError, atomic_file, atomic_folder,
                                     check_distinct, check_output, output_lock, remove, save_figure, together,
                                     write_json, write_text)
from safegene_fast.io.reader import Checkpoint, CheckpointError, TensorInfo, check_same_layout
from safegene_fast.io.writer import Planned, ShardedWriter, plan_shards

__all__ = ["Checkpoint", "CheckpointError", "OutputBusyError", "OutputExistsError", "Planned", "ShardedWriter",
           "TensorInfo", "UnsafeOutputError", "atomic_file", "atomic_folder", "check_distinct", "check_output",
           "check_same_layout", "output_lock", "plan_shards", "remove", "save_figure", "together", "write_json",
           "write_text"]
