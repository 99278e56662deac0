"""Seeing: vision-language models of the Idefics3 / SmolVLM family.

    import lmforge
    lm = lmforge.load("path/to/SmolVLM-256M-Instruct")     # lm.model is a VLM
    from lmforge.vision import chat_with_images
    chat_with_images(lm.model, lm.tokenizer, [{"role": "user", "content": [
        {"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}]}])

Files: `encoder` (SigLIP), `connector` (pixel shuffle + projection), `preprocess` (safe opening,
tiles, pixels), `prompt` (image tokens in chat prompts), `vlm` (the model), `generate` (cached
decoding with images), `load` (HF folders), `build` (a fresh tower + connector on any text
model), `synthetic` (pictures and questions with exact answers) and `vqa` (batches, loss and
evaluation for the one trainer loop; benchmarks/vlm_demo.py).
"""
from lmforge.vision.build import build_vlm, first_layers
from lmforge.vision.generate import chat_with_images, generate_with_images
from lmforge.vision.load import load_vlm
from lmforge.vision.preprocess import ImageBatch, ImageConfig, open_image, preprocess_images
from lmforge.vision.prompt import VisionPrompt, expand_image_tokens, image_prompt, render_chat
from lmforge.vision.vlm import VLM

__all__ = ["VLM", "ImageBatch", "build_vlm", "first_layers", "ImageConfig", "VisionPrompt", "chat_with_images", "expand_image_tokens",
           "generate_with_images", "image_prompt", "load_vlm", "open_image", "preprocess_images", "render_chat"]
