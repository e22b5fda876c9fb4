"""The fp32-GEMM path of CPU bf16 autocast against torch's own bf16 kernels (its reference twin)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from adanorm.lab import bf16_cpu
from adanorm.lab.runinfo import environment
from adanorm.lab.runtime import process_settings

# One bf16 ulp relative: the two paths round the same fp32 sum, which only the summation order
# may move across a rounding boundary.
BF16_ULP = 2.0**-7


def _operands(*shapes: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=generator).requires_grad_() for shape in shapes]


PRODUCTS: dict[str, tuple[Callable[..., torch.Tensor], list[tuple[int, ...]]]] = {
    "mm": (torch.mm, [(6, 40), (40, 5)]),
    "addmm": (
        lambda c, a, b: torch.addmm(c, a, b, beta=0.5, alpha=2.0), [(6, 5), (6, 40), (40, 5)]
    ),
    "bmm": (torch.bmm, [(3, 6, 40), (3, 40, 5)]),
    "baddbmm": (torch.baddbmm, [(3, 6, 5), (3, 6, 40), (3, 40, 5)]),
    "matmul": (torch.matmul, [(2, 3, 6, 40), (40, 5)]),
    "linear": (torch.nn.functional.linear, [(2, 6, 40), (5, 40), (5,)]),
}


def _forward_backward(product: Callable[..., torch.Tensor], operands: list[torch.Tensor]):
    for operand in operands:
        operand.grad = None
    with torch.autocast("cpu", torch.bfloat16):
        out = product(*operands)
    # A fixed, uneven upstream gradient, so every operand's gradient is a real product.
    upstream = torch.linspace(-2, 3, out.numel()).reshape(out.shape).to(out.dtype)
    (out.float() * upstream.float()).sum().backward()
    return out.detach(), [operand.grad.clone() for operand in operands]


@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_fp32_gemm_path_matches_the_native_bf16_kernels(name: str) -> None:
    product, shapes = PRODUCTS[name]
    operands = _operands(*shapes)
    native_out, native_grads = _forward_backward(product, operands)
    with bf16_cpu.fp32_bf16_matmul():
        out, grads = _forward_backward(product, operands)
    assert out.dtype == native_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, native_out, rtol=BF16_ULP, atol=1e-6)
    for grad, native_grad in zip(grads, native_grads, strict=True):
        assert grad.dtype == native_grad.dtype == torch.float32  # the parameter's own dtype
        torch.testing.assert_close(grad, native_grad, rtol=BF16_ULP, atol=1e-6)


def test_fp32_gemm_path_rounds_operands_and_result_to_bf16() -> None:
    a, b = _operands((16, 300), (300, 8))
    with bf16_cpu.fp32_bf16_matmul(), torch.autocast("cpu", torch.bfloat16):
        out = a @ b
    rounded = (a.detach().bfloat16().float() @ b.detach().bfloat16().float()).bfloat16()
    assert torch.equal(out, rounded)
    # ... which is not the fp32 product: the path keeps bf16 arithmetic, it does not skip it.
    assert not torch.equal(out.float(), a.detach() @ b.detach())


def test_addbmm_keeps_its_own_kernel() -> None:
    # Its bf16 kernel rounds each batch's product before the sum; one rounding would differ.
    c, a, b = _operands((6, 5), (3, 6, 40), (3, 40, 5))
    with torch.autocast("cpu", torch.bfloat16):
        native = torch.addbmm(c, a, b)
    with bf16_cpu.fp32_bf16_matmul(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(torch.addbmm(c, a, b), native)


def test_the_native_kernels_return_when_the_outermost_context_exits(monkeypatch) -> None:
    calls: list[int] = []
    widen = bf16_cpu._round_to_bf16_then_widen

    def counting(value):
        calls.append(1)
        return widen(value)

    monkeypatch.setattr(bf16_cpu, "_round_to_bf16_then_widen", counting)
    a, b = _operands((4, 8), (8, 3))

    def product_calls() -> int:
        calls.clear()
        with torch.autocast("cpu", torch.bfloat16):
            a @ b
        return len(calls)

    assert product_calls() == 0
    with bf16_cpu.fp32_bf16_matmul():
        with bf16_cpu.fp32_bf16_matmul():
            assert product_calls() == 2
        assert product_calls() == 2  # the inner exit keeps the outer context's kernels
    assert product_calls() == 0


@pytest.mark.parametrize(("matmul", "amp", "active"), [
    ("fp32-gemm", "bf16", True),
    ("native", "bf16", False),
    ("fp32-gemm", "none", False),
])
def test_a_cpu_run_uses_the_fp32_gemm_path_only_for_bf16_without_bf16_hardware(
    monkeypatch, matmul: str, amp: str, active: bool
) -> None:
    monkeypatch.setattr("adanorm.lab.runtime.bf16_matmul", lambda: matmul)
    entered: list[bool] = []
    real = bf16_cpu.fp32_bf16_matmul

    def spy():
        entered.append(True)
        return real()

    monkeypatch.setattr("adanorm.lab.runtime.fp32_bf16_matmul", spy)
    tcfg = {"threads": 1, "deterministic": False, "amp": amp}
    with process_settings(tcfg, torch.device("cpu")):
        pass
    assert entered == ([True] if active else [])
    assert bf16_cpu._depth == 0  # and left again


def test_the_environment_record_names_the_cpu_and_its_bf16_matmul_path() -> None:
    info = environment(torch.device("cpu"))
    assert info["bf16_matmul"] == bf16_cpu.bf16_matmul() in ("native", "fp32-gemm")
    assert isinstance(info["cpu"], str) and info["cpu"]
