"""CUDA paths: skipped without a GPU; `make gpu-check` runs them on one.

The fused layer against the eager reference on the GPU (fp32 and bf16), a few SFT steps with
activation checkpointing (their gradients against the plain backward's), and generation with
the adapter against the same model on the CPU.
"""

import pytest
import torch

from conftest import tiny_llama
from guilomo.moe import MoeConfig, build_allocation, inject_adapter
from guilomo.moe.config import LossConfig, RouterConfig
from test_layer import make_linear

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


FP32, BF16 = torch.float32, torch.bfloat16


# top_p's selection is a step function of the logits: in bf16 the two paths' logits differ
# by rounding and can pick different sets at the boundary, so it is compared in fp32 only
@pytest.mark.parametrize(
    "dtype,kind,top_k",
    [(FP32, "topk", 2), (BF16, "topk", 2), (FP32, "soft", 1), (BF16, "soft", 1)]
    + [(FP32, "top_p", 1)],
)
def test_fused_equals_eager_on_cuda(dtype, kind, top_k):
    x = torch.randn(4, 9, 12, device="cuda", dtype=dtype)
    out = {}
    for impl in ("fused", "eager"):
        layer = make_linear([2, 4, 6, 8], top_k, kind, impl).to("cuda", dtype)
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        grads = {n: p.grad.float() for n, p in layer.named_parameters() if p.grad is not None}
        out[impl] = (y.float(), xx.grad.float(), grads)
    (y_f, gx_f, g_f), (y_e, gx_e, g_e) = out["fused"], out["eager"]
    torch.testing.assert_close(y_f, y_e, **TOL[dtype])
    torch.testing.assert_close(gx_f, gx_e, **TOL[dtype])
    assert g_f.keys() == g_e.keys()
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_e[name], **TOL[dtype], msg=name)


def adapted(dtype, checkpointing):
    model = tiny_llama().to("cuda", dtype)
    alloc = build_allocation(
        base_model="tiny",
        module_names=[n for n, _ in model.named_modules()],
        preset="2468",
        rank=4,
    )
    config = MoeConfig(
        allocation=alloc,
        lora_dropout=0.1,
        router=RouterConfig(kind="topk"),
        losses=LossConfig(balance_coef=0.01),
    )
    adapter = inject_adapter(model, config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p))
    if checkpointing:
        adapter.enable_checkpointing()
    model.train()
    return model, adapter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sft_steps_with_checkpointing_on_cuda(dtype):
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1)).cuda()
    runs = {}
    for checkpointing in (False, True):
        model, adapter = adapted(dtype, checkpointing)
        opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
        losses = []
        for step in range(3):
            torch.manual_seed(step)
            out = model(input_ids=ids, labels=ids)
            loss = out.loss + adapter.aux_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        runs[checkpointing] = losses
    assert all(torch.isfinite(torch.tensor(runs[True])))
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), **TOL[dtype])


def test_generation_with_the_adapter_matches_the_cpu():
    model, _ = adapted(torch.float32, False)
    model.eval()
    prompts = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    on_gpu = model.generate(prompts.cuda(), **kw).cpu()
    on_cpu = model.cpu().generate(prompts, **kw)
    assert torch.equal(on_gpu, on_cpu)
