"""On a CUDA device, ``cached_step`` replays the GPU's random streams exactly (issue 14's GPU check).

Pass 2 must draw the dropout masks pass 1 drew. On the GPU those come from the CUDA generator,
which the CPU tests never touch, so these tests are the only check of ``gradcache_torch._rng``'s
CUDA half. Each compares, in float64, a cached step with a chunk-by-chunk forward under the same
seed (the same chunks in the same order draw the same masks) and asks for 1e-10 agreement; a
wrong mask is an error of order one. Placements: model and inputs on the GPU; inputs on the CPU,
moved inside the encoder (the original GradCache replayed only the inputs' devices); dropout on
both the CPU and the GPU in one encoder; and attention dropout inside
``scaled_dot_product_attention`` (float32: the fused kernels draw from the CUDA generator's
Philox offsets, not through ``F.dropout``).

CI has no GPU: the module is skipped there. ``benchmarks/gpu_check.sh`` runs it with ``-m cuda``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradcache.testing.contract import relative_error
from gradcache_torch import cached_step

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROWS, CHUNK = 10, 3  # chunks of 3, 3, 3 and 1 rows per group


def info_nce(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(q @ p.T / 0.1, torch.arange(len(q), device=q.device))


class Tower(torch.nn.Module):
    """Dropout on the GPU after the first layer; optionally on the CPU before it, on the input."""

    def __init__(self, cpu_dropout: float = 0.0, dim_in: int = 6):
        super().__init__()
        self.a = torch.nn.Linear(dim_in, 32)
        self.b = torch.nn.Linear(32, 4)
        self.cpu_dropout = cpu_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_dropout:
            x = F.dropout(x.cpu(), self.cpu_dropout, self.training)
        x = x.to(self.a.weight.device)  # a CPU input is moved here, inside the encoder
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.5, self.training))


class Attention(torch.nn.Module):
    """One self-attention layer with attention dropout, mean-pooled."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, length, dim = x.shape
        q, k, v = (t.reshape(rows, length, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3 if self.training else 0.0)
        return out.transpose(1, 2).reshape(rows, length, dim).mean(dim=1)


def twins(make, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = make().to("cuda", dtype)
    reference = make().to("cuda", dtype)
    reference.load_state_dict(model.state_dict())
    return model, reference


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.double().flatten() for p in model.parameters()
                      if p.grad is not None]).cpu()


def chunk_by_chunk(model: torch.nn.Module, groups) -> None:
    """The reference: every group's chunks encoded in the step's order, one loss, one backward."""
    reps = [torch.cat([model(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)]) for x in groups]
    info_nce(*reps).backward()


def check(model, reference, groups, tolerance: float, seed: int = 7) -> float:
    torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
    cached_step(model, groups, info_nce, chunk_size=CHUNK)
    torch.manual_seed(seed)
    chunk_by_chunk(reference, groups)
    error = relative_error(flat_grads(model).numpy(), flat_grads(reference).numpy())
    assert error <= tolerance, f"cached vs chunk-by-chunk: {error:.3g}"
    return error


def pair(device: str, dtype: torch.dtype, shape: tuple = (6,)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    q, p = (torch.randn(ROWS, *shape, generator=generator, dtype=dtype).to(device)
            for _ in range(2))
    return q, p


def test_gpu_dropout_is_replayed_exactly() -> None:
    model, reference = twins(Tower, torch.float64)
    check(model, reference, pair("cuda", torch.float64), 1e-10)
    # the masks matter: another seed's reference is far off (so the check above is not vacuous)
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    cached_step(model, pair("cuda", torch.float64), info_nce, chunk_size=CHUNK)
    torch.manual_seed(8)
    chunk_by_chunk(reference, pair("cuda", torch.float64))
    assert relative_error(flat_grads(model).numpy(), flat_grads(reference).numpy()) > 1e-3


def test_gpu_dropout_is_replayed_when_the_inputs_are_on_the_cpu() -> None:
    model, reference = twins(Tower, torch.float64)
    check(model, reference, pair("cpu", torch.float64), 1e-10)


def test_cpu_and_gpu_dropout_in_one_encoder_are_both_replayed() -> None:
    model, reference = twins(lambda: Tower(cpu_dropout=0.2), torch.float64)
    check(model, reference, pair("cuda", torch.float64), 1e-10)


def test_fused_attention_dropout_is_replayed() -> None:
    model, reference = twins(Attention, torch.float32)
    # float32: the reference's backward sums the chunks in another order (1e-4: the suite's bound)
    check(model, reference, pair("cuda", torch.float32, shape=(5, 32)), 1e-4)
