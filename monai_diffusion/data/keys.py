"""The keys of a data item."""

IMAGE_KEY = "image"  # FloatTensor (C, H, W, D) in [0, 1]
PATH_KEY = "path"  # the NIfTI file, or "synthetic://<seed>/<index>"
AFFINE_KEY = "affine"  # DoubleTensor (4, 4): voxel -> world (RAS, mm)
LABEL_KEY = "label"  # FloatTensor (1, H, W, D) of integer classes: the volume's label map (data.num_classes)
