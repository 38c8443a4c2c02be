"""Checkpoints: transformers safetensors folders (dense or MXFP4 experts) in and out, and Orbax."""
