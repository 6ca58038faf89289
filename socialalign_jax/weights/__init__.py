"""Everything read from or written to files that other tools also read: the one string that names a
base model everywhere (resolve), Hugging Face safetensors checkpoints (hf), GGUF files (gguf), the
offline tokenizer and chat template (tokenizer), and PAC-LoRA adapters in our and PEFT's layouts
(adapters). transformers, peft and llama.cpp must read what we write, so their formats live here
together.
"""
