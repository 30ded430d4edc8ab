"""A small image set made on the spot, as real PNG and JPEG files: pictures of a disc, a bar or a cross
in random colours and places on a noisy background, one folder per class (``prepare images``' input).

    python -m mpirt.data.shapes DIR [--per-class 120] [--size 40] [--seed 0]

The demo and the image benchmark train on it (nothing is downloaded); the shape, not the colour,
tells the class, so a model has to learn edges.
"""

import argparse
import os

import numpy as np

CLASSES = ("disc", "bar", "cross")


def write_shapes(root, per_class=120, size=40, seed=0):
    """Write ``per_class`` images of each class under ``root/<class>/``; return the number written."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    r = max(size // 6, 2)
    for name in CLASSES:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            im = Image.fromarray(rng.integers(0, 70, (size, size, 3), dtype=np.uint8))
            d, c = ImageDraw.Draw(im), tuple(int(v) for v in rng.integers(120, 256, 3))
            x, y = (int(v) for v in rng.integers(r + 2, size - r - 2, 2))
            if name == "disc":
                d.ellipse((x - r, y - r, x + r, y + r), fill=c)
            elif name == "bar":
                d.rectangle((x - r - 2, y - r // 2, x + r + 2, y + r // 2), fill=c)
            else:
                d.rectangle((x - r, y - r // 3, x + r, y + r // 3), fill=c)
                d.rectangle((x - r // 3, y - r, x + r // 3, y + r), fill=c)
            im.save(os.path.join(root, name, f"{i:04d}.{'png' if i % 2 else 'jpg'}"))
    return per_class * len(CLASSES)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpirt.data.shapes")
    p.add_argument("output", metavar="DIR")
    p.add_argument("--per-class", type=int, default=120)
    p.add_argument("--size", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = write_shapes(args.output, args.per_class, args.size, args.seed)
    print(f"{args.output}: {n} images in {len(CLASSES)} class folders ({', '.join(CLASSES)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
