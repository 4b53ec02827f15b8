"""The data pipeline: phantoms (``phantoms``), NIfTI files and their split (``files``), MONAI transforms
(``transforms``), datasets (``datasets``), patches (``patches``), the volume cache (``cache``), the training
loaders (``loaders``) and NIfTI writing (``nifti``)."""

from monai_diffusion.data.datasets import build_datasets, build_file_dataset, default_workers, make_loader, model_input
from monai_diffusion.data.files import find_nifti_files, split_files
from monai_diffusion.data.keys import AFFINE_KEY, IMAGE_KEY, LABEL_KEY, PATH_KEY
from monai_diffusion.data.nifti import save_nifti
from monai_diffusion.data.phantoms import SyntheticPhantomDataset, make_labelled_phantom, make_phantom
from monai_diffusion.data.transforms import CheckedCompose, KeepAffined, LoadCheckedd, build_nifti_transforms
from monai_diffusion.errors import DataError

__all__ = [
    "DataError",
    "IMAGE_KEY",
    "LABEL_KEY",
    "PATH_KEY",
    "AFFINE_KEY",
    "make_phantom",
    "make_labelled_phantom",
    "SyntheticPhantomDataset",
    "find_nifti_files",
    "split_files",
    "LoadCheckedd",
    "KeepAffined",
    "CheckedCompose",
    "build_nifti_transforms",
    "build_datasets",
    "build_file_dataset",
    "make_loader",
    "default_workers",
    "model_input",
    "save_nifti",
]
