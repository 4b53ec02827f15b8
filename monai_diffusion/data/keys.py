"""The keys of a data item."""

IMAGE_KEY = "image"  # FloatTensor (C, H, W, D) in [0, 1]
PATH_KEY = "path"  # the NIfTI file, or "synthetic://<seed>/<index>"
AFFINE_KEY = "affine"  # DoubleTensor (4, 4): voxel -> world (RAS, mm)
