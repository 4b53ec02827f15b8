"""Import public weights as run folders: python import_weights.py maisi|brain-ldm|generative --autoencoder FILE
[--unet FILE] --output DIR (see docs/pretrained.md)"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("import_weights_main"))
