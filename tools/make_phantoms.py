#!/usr/bin/env python
"""
Write a set of synthetic ultrasound phantoms (PNG images + COCO JSON) to a folder.

The registered sets (``synthetic_train``, ``synthetic_val``, ``synthetic_tiny``) are generated
on first use; this tool writes any size or seed, e.g. for a larger experiment:

    python tools/make_phantoms.py --output datasets/phantoms_2k --num-images 2000 --seed 7
    python tools/make_phantoms.py --output /tmp/val --like synthetic_val
"""
import argparse
import os

from thyroid_det.data.datasets.phantoms import SYNTHETIC_SETS, generate_phantoms
from thyroid_det.utils.cli import cli_errors


@cli_errors("make_phantoms.py")
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--like", choices=sorted(SYNTHETIC_SETS), help="a registered set's spec")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)

    spec = {"num_images": args.num_images, "seed": args.seed, "image_size": tuple(args.size)}
    if args.like:
        spec = dict(SYNTHETIC_SETS[args.like])
    if os.path.exists(args.output) and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it.")
    json_file = generate_phantoms(args.output, overwrite=args.overwrite, **spec)
    image_root = os.path.join(os.path.abspath(args.output), "images")
    name = os.path.basename(os.path.normpath(args.output))
    print(f"Wrote {spec['num_images']} phantoms to {args.output}. Train on them with:")
    print(f"  DATASETS.COCO_REGISTER \"[['{name}', '{json_file}', '{image_root}']]\"")
    return json_file


if __name__ == "__main__":
    main()
