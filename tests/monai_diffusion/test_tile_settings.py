"""One resolver for the tile settings (monai_diffusion/config/tiles.py): its rules, and that every reader
of the tile keys goes through it (one default for the overlap everywhere)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from monai_diffusion.config import ConfigError, load_config
from monai_diffusion.config.tiles import resolve_tiles

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "monai_diffusion" / "config" / "ldm_config.yaml"
# the keys' only readers: the schema (where they are declared, with Config.inference_tile), the rules that
# validate them, and the resolver
ALLOWED = {Path("monai_diffusion/config/schema.py"), Path("monai_diffusion/config/rules.py"),
           Path("monai_diffusion/config/tiles.py")}
KEYS = {"inference_tile", "tile_overlap", "tile_buffers"}


def test_resolution_rules():
    patches = load_config(CONFIG, ["data.image_size=[64, 64, 32]", "data.patch_size=[32, 32, 32]",
                                   "autoencoder.tile_overlap=0.25"])
    tiles = resolve_tiles(patches)
    assert (tiles.tile_size, tiles.overlap, tiles.buffers) == ([32, 32, 32], 0.25, "auto")  # patch size, config
    assert resolve_tiles(patches, 16, None, "disk").tile_size == 16  # the command line wins, as given
    assert resolve_tiles(patches, [16, 8, 8], 0.5).overlap == 0.5
    assert resolve_tiles(patches, buffers="device").inferer().buffers == "device"
    keyed = load_config(CONFIG, ["data.image_size=[64, 64, 32]", "autoencoder.tile_size=16",
                                 "autoencoder.tile_buffers=cpu"])
    tiles = resolve_tiles(keyed)
    assert (tiles.tile_size, tiles.overlap, tiles.buffers) == ([16, 16, 16], 0.5, "cpu")
    assert tiles.summary() == {"tile_size": [16, 16, 16], "tile_overlap": 0.5}
    whole = resolve_tiles(load_config(CONFIG, ["data.image_size=[64, 64, 32]"]))
    assert whole.tile_size is None and whole.inferer() is None and whole.summary() is None
    with pytest.raises(ConfigError, match=r"--tile-size/--tile-overlap: tile_size = \[6, 6, 6\]: .*use 4 or 8"):
        resolve_tiles(keyed, 6, check=((64, 64, 32), (4, 4, 4)))


def test_every_reader_of_the_tile_settings_goes_through_the_resolver():
    """No module outside the schema, the rules and the resolver reads the tile keys itself (evaluation used to
    default the overlap to 0.5 while sampling took autoencoder.tile_overlap)."""
    readers = []
    for folder in ("monai_diffusion", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative in ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                # attribute reads such as config.inference_tile or ae.tile_overlap (not the command-line values of
                # argparse's args.* or of a SamplingRequest, which are handed to the resolver)
                if isinstance(node, ast.Attribute) and node.attr in KEYS and not (
                        isinstance(node.value, ast.Name) and node.value.id in ("args", "request")):
                    readers.append(f"{relative}:{node.lineno}: .{node.attr}")
    assert readers == []


def test_no_command_has_its_own_overlap_default():
    from monai_diffusion.evaluation.reconstruction import evaluate_autoencoder
    from monai_diffusion.generation.latents import encode_latents
    from monai_diffusion.generation.sampling import SamplingRequest, sample_volumes

    for function in (evaluate_autoencoder, sample_volumes):
        assert inspect.signature(function).parameters["tile_overlap"].default is None, function.__name__
    assert {f.name: f.default for f in dataclasses.fields(SamplingRequest)}["tile_overlap"] is None
    assert "tile_overlap" not in inspect.signature(encode_latents).parameters
