"""Your own Dataset + torchvision v2 transforms + loader workers + spaced KD, replayed exactly.

The KeyedLoader takes the DataLoader arguments you know and names every batch by a key; the
distiller keeps only that key and a checksum, and the student's replay reloads the batch through
the workers with the same random crops and flips the teacher saw (checked against the checksum).

    python examples/own_dataset_spaced_kd.py            # about a minute on 2 CPU cores
    python examples/own_dataset_spaced_kd.py --tiny     # seconds (what CI runs)
"""

import torch
from torchvision.transforms import v2
from toy_shapes import ToyShapes, example_args

import spacedkd_fast as sk
from spacedkd_fast.models import create

args = example_args(__doc__.splitlines()[0])

mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
train_tf = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(32, scale=(0.6, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std)])
test_tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
train_set = ToyShapes(args.train_images, seed=0, transform=train_tf)
test_set = ToyShapes(args.train_images // 4, seed=1, transform=test_tf)

loader = sk.KeyedLoader(train_set, batch_size=64, shuffle=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0, seed=0)
test_loader = torch.utils.data.DataLoader(test_set, batch_size=256)  # plain: no keys needed

torch.manual_seed(0)
teacher = create("resnet18", num_classes=3, image_size=32, downsample_factor=16)
student = create("resnet18", num_classes=3, image_size=32, downsample_factor=64)
t_opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
s_opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
d = sk.SpacedDistiller(teacher, student, t_opt, s_opt, mode="spaced", interval_rate=1.0,
                       steps_per_epoch=len(loader), source=loader,
                       loss=sk.KDObjective(temperature=3.0, alpha=0.3))

held = 0.0
for epoch in range(args.epochs):
    for key, (x, y) in loader.epoch(epoch):  # the key is what the engine keeps
        d.step(key, x, y)
        held = max(held, d.replay_buffer.bytes_per_sample())
    print(f"epoch {epoch + 1}: teacher {sk.evaluate(teacher, test_loader)['top1']:.1%}, "
          f"student {sk.evaluate(student, test_loader)['top1']:.1%} top-1")
d.finish()  # the student replays the batches after its last interval
loader.close()  # its persistent workers stop now
result = sk.evaluate(student, test_loader)
print(f"student after spaced KD: top-1 {result['top1']:.1%}, top-5 {result['top5']:.1%}, "
      f"loss {result['loss']:.3f}; {d.student_steps} student steps, each a replayed batch")
print(f"replay memory: at most {held:.2f} bytes per pending sample (a key and a checksum per "
      "batch), instead of a copy of every image")
