"""The model families the project builds rather than downloads: the embedded toy family (``toy``),
SmolLM2-135M-Instruct converted from its GGUF file (``smollm2``) and the study family fine-tuned
from it (``smollm2_family``), generated Llama-shaped checkpoints (``synthetic``), and the one
training recipe they share (``training``)."""
