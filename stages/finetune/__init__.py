"""Fine-tuning and multi-view evaluation of pretrained backbones on labeled datasets (VIMPAC Sec. 4, App. C)."""
