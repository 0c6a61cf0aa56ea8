"""The online-KD student's projection head (SPEC section 2).

The engine attaches it to the student so that the student's pooled features can be compared with the
teacher's (``feature_loss(head(f_s), f_t.detach())``) even when the two widths differ.
"""

from __future__ import annotations

from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """``Linear(s -> (s + t) // 2) -> ReLU -> Linear(-> t)``.

    Args:
        student_dim: ``s``, the student's ``feature_dim``.
        teacher_dim: ``t``, the teacher's ``feature_dim``.

    Forward: ``[B, s]`` -> ``[B, t]``.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        for label, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ProjectionHead: {label} must be a positive int, got {value!r}")
        hidden = (student_dim + teacher_dim) // 2
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.net = nn.Sequential(
            nn.Linear(student_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, teacher_dim)
        )

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 2 or features.shape[1] != self.student_dim:
            raise ValueError(
                f"ProjectionHead expects student features [B, {self.student_dim}], "
                f"got {list(features.shape)}"
            )
        return self.net(features)

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}"


__all__ = ["ProjectionHead"]
