"""A timm model trained with timm's own training transform, distilled from a teacher with spaced
KD, replayed exactly.

timm's ``create_transform`` (RandAugment, random erasing, bicubic random-resized crop) draws from
Python's ``random`` and torch's global generator; the KeyedLoader seeds both for every sample from
(seed, key, position), so the student's replay gets the very pixels the teacher trained on.

    python examples/timm_model.py            # about a minute on 2 CPU cores
    python examples/timm_model.py --tiny     # seconds (what CI runs)
"""

import timm
import torch
from timm.data import create_transform
from toy_shapes import ToyShapes, example_args

import spacedkd_fast as sk
from spacedkd_fast.models import create

args = example_args(__doc__.splitlines()[0])

train_tf = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                            re_prob=0.25, re_mode="pixel", interpolation="bicubic")
test_tf = create_transform(32, is_training=False, crop_pct=1.0)
train_set = ToyShapes(args.train_images, seed=0, transform=train_tf)
test_set = ToyShapes(args.train_images // 4, seed=1, transform=test_tf)
loader = sk.KeyedLoader(train_set, batch_size=64, num_workers=args.workers,
                        persistent_workers=args.workers > 0, seed=0)
test_loader = torch.utils.data.DataLoader(test_set, batch_size=256)

torch.manual_seed(0)
teacher = create("resnet18", num_classes=3, image_size=32, downsample_factor=16)
# any timm model: it returns logits, which the distillers take as they are
student = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=3)
t_opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
s_opt = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=0.05)
d = sk.SpacedDistiller(teacher, student, t_opt, s_opt, mode="spaced", interval_rate=1.0,
                       steps_per_epoch=len(loader), source=loader)
for epoch in range(args.epochs):
    for key, (x, y) in loader.epoch(epoch):
        d.step(key, x, y)
d.finish()
loader.close()  # its persistent workers stop now
for name, model in (("teacher (resnet18/16)", teacher), ("student (timm mobilenetv3)", student)):
    r = sk.evaluate(model, test_loader)
    print(f"{name}: top-1 {r['top1']:.1%}, top-5 {r['top5']:.1%}, loss {r['loss']:.3f}")
print(f"{d.student_steps} student steps on replayed batches, every one checked bit-exact")
