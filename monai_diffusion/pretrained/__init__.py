"""Public pretrained weights: import them as run folders (``importer``), their key layouts (``layouts``), the
UNet variants they need (``unet``) and fine-tuning starts (``init_from``). See docs/pretrained.md."""
