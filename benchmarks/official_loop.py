"""A re-creation of the official Spaced-KD training loop, for the end-to-end speed comparison.

What makes the official loop what it is, kept here on purpose:

- a ``Dataset`` that turns each stored ``uint8`` image into a PIL image and runs the torchvision
  transforms per sample (random crop 32 with padding 4, horizontal flip, rotation 15 degrees,
  ``ToTensor``, ``Normalize``), batched by a ``DataLoader`` with shuffling;
- the teacher trains on every batch and the loop keeps a float32 copy of each batch's pixels (and
  labels) on the host until the student replays them (``n % I == 0``; ``I = 0`` means online KD:
  the student steps on the same batch right after the teacher's forward);
- the student's loss is built from separate torch ops: cross-entropy, the official objective
  (probabilities passed to ``nn.KLDivLoss(reduction="batchmean")``) and ``torch.dist`` between the
  projected student features and the teacher's, each op its own kernel and temporaries;
- the teacher's forward for soft targets runs in train mode and updates its BatchNorm statistics.

The models, optimiser settings and data are the caller's, so that a benchmark compares loops,
not networks. On a GPU (``device="cuda"``) each batch is copied to the device after the loader, and
the stored host copies are copied again when replayed, as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class PerSampleImages(Dataset):
    """``uint8 [N, H, W, 3]`` images through per-sample torchvision transforms (CIFAR style)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int = 32) -> None:
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([
            transforms.RandomCrop(size, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.RandomRotation(15),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def official_loader(images: np.ndarray, labels: np.ndarray, *, batch_size: int = 128,
                    num_workers: int = 0, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(PerSampleImages(images, labels, size=images.shape[1]), batch_size=batch_size, shuffle=True,
                      num_workers=num_workers, generator=g)


def paper_code_loss(s_logits: Tensor, t_logits: Tensor, y: Tensor, *, temperature: float,
                    alpha: float) -> Tensor:
    """The official objective, unfused: CE + KLDivLoss fed with probabilities."""
    ce = F.cross_entropy(s_logits, y)
    kd = nn.KLDivLoss(reduction="batchmean")(F.softmax(s_logits / temperature, dim=1),
                                             F.softmax(t_logits / temperature, dim=1))
    return (1 - alpha) * ce + alpha * kd


@dataclass
class OfficialLoop:
    """Teacher + student + projector trained the official way; ``epoch(loader)`` runs one epoch.

    ``interval``: ``I`` in steps (0 = online KD). State (step counter, stored batches) persists
    across epochs like the official loop's.
    """

    teacher: nn.Module
    student: nn.Module
    projector: nn.Module
    teacher_opt: torch.optim.Optimizer
    student_opt: torch.optim.Optimizer
    interval: int
    temperature: float = 3.0
    alpha: float = 0.3
    beta: float = 0.03
    device: str = "cpu"
    n: int = 0
    stored: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def _student_step(self, x: Tensor, y: Tensor, t_feat: Tensor, t_logits: Tensor) -> None:
        s_feat, s_logits = self.student(x)
        loss = paper_code_loss(s_logits, t_logits, y, temperature=self.temperature,
                               alpha=self.alpha)
        loss = loss + self.beta * torch.dist(self.projector(s_feat), t_feat)
        self.student_opt.zero_grad()
        loss.backward()
        self.student_opt.step()

    def epoch(self, loader: DataLoader) -> int:
        """One pass over ``loader``; returns the number of images the teacher trained on."""
        self.teacher.train()
        self.student.train()
        images = 0
        for x_host, y_host in loader:
            self.n += 1
            images += x_host.shape[0]
            x, y = x_host.to(self.device), y_host.to(self.device)
            t_feat, t_logits = self.teacher(x)
            loss = F.cross_entropy(t_logits, y)
            if self.interval == 0:  # online KD: same batch, the teacher's logits before its step
                self._student_step(x, y, t_feat.detach(), t_logits.detach())
            self.teacher_opt.zero_grad()
            loss.backward()
            self.teacher_opt.step()
            if self.interval == 0:
                continue
            self.stored.append((x_host.clone(), y_host.clone()))  # float32 pixels on the host
            if self.n % self.interval == 0:
                for bx, by in self.stored:
                    bx, by = bx.to(self.device), by.to(self.device)
                    with torch.no_grad():
                        t_feat, t_logits = self.teacher(bx)  # train mode: BN statistics move
                    self._student_step(bx, by, t_feat, t_logits)
                self.stored.clear()
        if self.device != "cpu":
            torch.cuda.synchronize(self.device)
        return images
