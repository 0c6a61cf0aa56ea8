"""A plain DataLoader without keys: spaced KD still works, through CopyReplay, which keeps a copy
of every batch until the student replays it. This prints what that costs, next to the
KeyedLoader's key-and-checksum replay of the same data and transforms.

With a plain loader, pass any distinct ``key`` per step (here the step number): CopyReplay only
uses it to name the batch in the trace. The copies are float32 images: 12 KB per 32 px image,
600 KB per 224 px image, held for up to one spacing interval (``interval_rate`` epochs).

    python examples/plain_loader_copy_replay.py            # about a minute on 2 CPU cores
    python examples/plain_loader_copy_replay.py --tiny     # seconds (what CI runs)
"""

import torch
from torchvision.transforms import v2
from toy_shapes import ToyShapes, example_args

import spacedkd_fast as sk
from spacedkd_fast.models import create

args = example_args(__doc__.splitlines()[0], epochs=3)

tf = v2.Compose([v2.ToImage(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                 v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)])
train_set = ToyShapes(args.train_images, seed=0, transform=tf)


def distill(source):
    """Spaced KD over ``args.epochs`` epochs; ``source=None`` is the plain loader's path."""
    torch.manual_seed(0)
    teacher = create("resnet18", num_classes=3, image_size=32, downsample_factor=64)
    student = create("resnet18", num_classes=3, image_size=32, downsample_factor=64)
    d = sk.SpacedDistiller(teacher, student, torch.optim.SGD(teacher.parameters(), lr=0.05),
                           torch.optim.SGD(student.parameters(), lr=0.05), mode="spaced",
                           interval_rate=1.5, steps_per_epoch=steps, source=source)
    peak_bytes = peak_samples = 0
    n = 0
    for epoch in range(args.epochs):
        batches = plain if source is None else source.epoch(epoch)
        for item in batches:
            n += 1
            key, (x, y) = (n, item) if source is None else item  # plain: the step number
            d.step(key, x, y)
            if d.replay_buffer.bytes_held() > peak_bytes:
                peak_bytes = d.replay_buffer.bytes_held()
                peak_samples = d.replay_buffer.samples_held
    d.finish()
    return type(d.replay_buffer).__name__, peak_bytes, peak_samples


plain = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True,
                                    num_workers=args.workers, persistent_workers=args.workers > 0)
steps = len(plain)
keyed = sk.KeyedLoader(train_set, batch_size=64, num_workers=args.workers,
                       persistent_workers=args.workers > 0, seed=0)
for name, source in (("plain DataLoader", None), ("KeyedLoader", keyed)):
    kind, peak, samples = distill(source)
    print(f"{name:>16}: {kind}, at most {peak:,} bytes held for {samples} pending samples "
          f"({peak / samples:,.2f} B per sample)")
keyed.close()  # its persistent workers stop now
