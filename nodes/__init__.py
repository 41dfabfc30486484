"""ComfyUI nodes (classic V1 API). Every ``comfy``/``folder_paths``/``server`` import happens inside a function,
so this package imports, and its schemas can be tested, where ComfyUI is absent."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
