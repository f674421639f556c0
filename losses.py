"""The distillation loss of Clip & Concat: ``base + alpha * KD`` from a dense teacher.

Unlike DeiT's ``(1 - alpha) * base + alpha * KD``, the base loss keeps its full weight.  A student with one head
reads both terms from it; a distilled DeiT student, as in DeiT, the base loss from its class head and KD from its
distillation head.  Each call leaves its two terms, unweighted and detached, in ``terms`` (what the training log
reports as ``loss_base`` and ``loss_kd``: ``loss = loss_base + alpha * loss_kd``).
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_distillation(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(teacher || student) at temperature tau, summed, times tau² and divided by ``student.numel()``.  Both
    logits are divided in float32 at least (float64 stays): fp16 logits under autocast (CUDA) overflowed at a small
    tau (10 / 1e-4)."""
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    return F.kl_div(F.log_softmax(student.to(dtype) / tau, dim=1), F.log_softmax(teacher.to(dtype) / tau, dim=1),
                    reduction='sum', log_target=True) * (tau * tau) / student.numel()


def hard_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross entropy against the teacher's arg-max class."""
    return F.cross_entropy(student, teacher.argmax(dim=1))


class DistillationLoss(nn.Module):
    """Wraps the base criterion; the teacher sees the same (augmented, mixed) images, without gradients."""

    def __init__(self, base_criterion: nn.Module, teacher: nn.Module = None, distillation_type: str = 'none',
                 alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in ('none', 'soft', 'hard'):
            raise ValueError(f'unknown distillation type {distillation_type}')
        if distillation_type != 'none' and teacher is None:
            raise ValueError(f'{distillation_type} distillation needs a teacher')
        self.base_criterion, self.teacher = base_criterion, teacher
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau
        # The last call's terms, detached: {'loss_base': ..., 'loss_kd': ...}; None before the first call and
        # without distillation (the loss is then the base loss alone).
        self.terms: Optional[Dict[str, torch.Tensor]] = None

    def forward(self, inputs: torch.Tensor, outputs, labels: torch.Tensor) -> torch.Tensor:
        """``outputs``: the student's logits, or ``(class head, distillation head)`` from a distilled DeiT in
        distilled training, where, as in DeiT, the base loss reads the class head and KD the distillation head."""
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base = self.base_criterion(outputs, labels)
        self.terms = None
        if self.distillation_type == 'none':
            return base
        if outputs_kd is None:
            outputs_kd = outputs
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        if self.distillation_type == 'soft':
            kd = soft_distillation(outputs_kd, teacher_outputs, self.tau)
        else:
            kd = hard_distillation(outputs_kd, teacher_outputs)
        self.terms = {'loss_base': base.detach(), 'loss_kd': kd.detach()}
        return base + self.alpha * kd
