"""Spaced self KD on your own data: one multi-exit network whose shallow exits learn from its
deepest exit as it stood a spacing interval later, replayed exactly through the KeyedLoader.

    python examples/self_kd.py            # about a minute on 2 CPU cores
    python examples/self_kd.py --tiny     # seconds (what CI runs)
"""

import torch
from torchvision.transforms import v2
from toy_shapes import ToyShapes, example_args

import spacedkd_fast as sk
from spacedkd_fast.models import create

args = example_args(__doc__.splitlines()[0])

norm = v2.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
train_tf = v2.Compose([v2.ToImage(), v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True), norm])
test_tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), norm])
loader = sk.KeyedLoader(ToyShapes(args.train_images, seed=0, transform=train_tf), batch_size=64,
                        num_workers=args.workers, persistent_workers=args.workers > 0, seed=0)
test_loader = torch.utils.data.DataLoader(ToyShapes(args.train_images // 4, seed=1,
                                                    transform=test_tf), batch_size=256)

torch.manual_seed(0)
model = create("byot_resnet18", num_classes=3, image_size=32, downsample_factor=64)  # 4 exits
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
d = sk.SelfDistiller(model, opt, mode="spaced-self", interval_rate=1.0,
                     steps_per_epoch=len(loader), source=loader)
for epoch in range(args.epochs):
    for key, (x, y) in loader.epoch(epoch):
        d.step(key, x, y)
d.finish()
loader.close()  # its persistent workers stop now
r = sk.evaluate(model, test_loader)  # multi-exit: every exit and their ensemble
exits = ", ".join(f"exit {i} {r[f'exit{i}_top1']:.1%}" for i in range(1, 5))
print(f"top-1: {exits}, ensemble {r['ensemble_top1']:.1%}")
