"""The SD3.5 engine: MM-DiT(-X), VAE, triple text encoder, checkpoints, schedules, pipeline and CLI.

Plain PyTorch + safetensors + transformers. This package never imports ComfyUI.
"""
