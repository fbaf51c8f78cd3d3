"""Model files, shared by the gateway (tokenizer, chat template, served name) and the
worker (config, weights): where a model directory is (`locate_model`), what its
config.json says (`config.py`), reading its safetensors (`loader.py`), and the one-time
conversion of the built-in GGUF model (`gguf_convert.py`). Imports nothing of ours."""
