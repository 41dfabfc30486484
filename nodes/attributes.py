"""What the pack records on a ComfyUI ``BaseModel`` (``model.model``), so that every clone of its ModelPatcher sees
it, and which of it a quantized copy of the model keeps (docs/comfyui.md "Native types")."""

METADATA_ATTRIBUTE = "sd35_flash_metadata"  # the checkpoint's FlashMetadata (student grid, provenance)
DOWNSCALE_ATTRIBUTE = "sd35_flash_vae_downscale"  # the checkpoint's VAE's pixels per latent
QUANT_ATTRIBUTE = "sd35_flash_quantization"  # {"format": ..., "layers": ..., ...} of a quantized MM-DiT
CARRIED = (METADATA_ATTRIBUTE, DOWNSCALE_ATTRIBUTE)  # what Quantize MODEL copies to the model it makes
