"""Key mappings between the official (Stability / ComfyUI) layout and diffusers, one module per component."""
