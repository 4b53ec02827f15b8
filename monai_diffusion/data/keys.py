"""The keys of a data item."""

IMAGE_KEY = "image"  # FloatTensor (C, H, W, D) in [0, 1]
PATH_KEY = "path"  # the NIfTI file, or "synthetic://<seed>/<index>"
AFFINE_KEY = "affine"  # DoubleTensor (4, 4): voxel -> world (RAS, mm)
LABEL_KEY = "label"  # FloatTensor (1, H, W, D) of integer classes: the volume's label map (data.num_classes)

# the covariates of the built-in phantoms (data.phantom_covariates): a class and a continuous factor
CAVITY_KEY = "cavity"  # 0 or 1: whether the phantom has a central cavity
SIZE_KEY = "size"  # the body's scale, in SIZE_RANGE of phantoms.py
PHANTOM_COVARIATES = (CAVITY_KEY, SIZE_KEY)
