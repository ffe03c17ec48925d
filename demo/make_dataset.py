"""Writes a deterministic synthetic image-classification dataset as shard files. No downloads.

Ten classes of 28x28 grayscale images (MNIST-sized): each class is a fixed
pattern of strokes; every image is its class pattern shifted by up to 3
pixels, scaled in brightness and covered in noise. A small CNN learns it to
high accuracy in a couple of epochs; a linear model does noticeably worse.

    python demo/make_dataset.py --out rankwarden-jobs/data

writes shard_0000.pt ... (torch.save of {"x": uint8[N,28,28], "y": int64[N]}),
test.pt and index.json. Running it again with the same settings does nothing.
"""

import argparse
import json
import os

import torch

SIZE = 28


def class_patterns(gen: torch.Generator, classes: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    patterns = torch.zeros(classes, SIZE, SIZE)
    for c in range(classes):
        for _ in range(3):  # three strokes: elongated gaussians at random angles
            cy, cx = (torch.rand(2, generator=gen) * 14 + 7).tolist()
            angle = float(torch.rand(1, generator=gen)) * 3.14159
            length, width = 4 + float(torch.rand(1, generator=gen)) * 5, 1.2
            dy, dx = ys - cy, xs - cx
            along = dx * torch.cos(torch.tensor(angle)) + dy * torch.sin(torch.tensor(angle))
            across = -dx * torch.sin(torch.tensor(angle)) + dy * torch.cos(torch.tensor(angle))
            patterns[c] += torch.exp(-(along / length) ** 2 - (across / width) ** 2)
        patterns[c] /= patterns[c].max()
    return patterns


def make_images(patterns: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, patterns.shape[0], (n,), generator=gen)
    images = torch.empty(n, SIZE, SIZE)
    shifts = torch.randint(-3, 4, (n, 2), generator=gen)
    brightness = 0.7 + 0.6 * torch.rand(n, generator=gen)
    for i in range(n):
        images[i] = torch.roll(patterns[labels[i]], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(0, 1)) * brightness[i]
    images += 0.35 * torch.randn(n, SIZE, SIZE, generator=gen)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="rankwarden-jobs/data")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--records-per-shard", type=int, default=1024)
    parser.add_argument("--test-records", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    index = {"shards": [f"shard_{i:04d}.pt" for i in range(args.shards)], "records_per_shard": args.records_per_shard,
             "test": "test.pt", "test_records": args.test_records, "classes": args.classes, "seed": args.seed}
    index_path = os.path.join(args.out, "index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            if json.load(f) == index:
                print(f"dataset already in {args.out}")
                return
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    patterns = class_patterns(gen, args.classes)
    for name in index["shards"]:
        x, y = make_images(patterns, args.records_per_shard, gen)
        torch.save({"x": x, "y": y}, os.path.join(args.out, name))
    x, y = make_images(patterns, args.test_records, gen)
    torch.save({"x": x, "y": y}, os.path.join(args.out, "test.pt"))
    with open(index_path + ".tmp", "w") as f:
        json.dump(index, f, indent=1)
    os.replace(index_path + ".tmp", index_path)  # written last: a complete dataset or none
    print(f"wrote {args.shards} x {args.records_per_shard} training and {args.test_records} test images to {args.out}")


if __name__ == "__main__":
    main()
