"""Inference engines: multi-LoRA layers and slots (lora, lora_model), classification (classifier, batcher)
and generation. Nothing here knows about HTTP; the service layer drives engines through SlotEngine.
"""
