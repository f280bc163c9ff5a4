"""The fused Triton importance kernel against the naive full-softmax reference: on CPU through triton's
interpreter (small shapes: it is slow), on CUDA where there is a GPU.

Triton builds its own library functions (tl.sum, ...) when it is imported, so TRITON_INTERPRET=1 must be set
before that: ``test_interpreter_tests_pass_in_a_subprocess`` runs the ``interpret`` tests of this file in a fresh
process with the variable set; ``TRITON_INTERPRET=1 pytest tests/test_importance_kernel.py`` runs them directly.
"""
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fpt.extract import FrozenLPM, create_backbone, num_selected, select_important_tokens, token_importance
from fpt.extract import selection
from tests.conftest import MICRO
from tests.helpers import assert_is_topk, naive_importance, reference_qkv

pytest.importorskip("triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL_TILES = {"lse": dict(BLOCK_Q=16, BLOCK_K=32), "col": dict(BLOCK_Q=32, BLOCK_K=16)}


@pytest.fixture
def interpret():
    """Tests that run the kernels in triton's CPU interpreter: only in a process started with TRITON_INTERPRET=1."""
    from fpt.extract.importance_kernel import interpreting

    if not interpreting():
        pytest.skip("run by test_interpreter_tests_pass_in_a_subprocess (needs TRITON_INTERPRET=1 from the start)")


def test_interpreter_tests_pass_in_a_subprocess():
    from fpt.extract.importance_kernel import interpreting

    if interpreting():
        pytest.skip("this is the subprocess")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", "not cuda and not compile",
                          str(Path(__file__).resolve())], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 14 and "skipped" in summary, summary   # skipped: only this test
    assert re.search(r"\b1 skipped", summary), summary


def random_qk(shape, dtype, seed, device="cpu"):
    """Keys with unequal norms, so importance is spread out as in a trained ViT, not nearly uniform."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    k = k * (0.5 + 1.5 * torch.rand(*shape[:-1], 1, generator=g))
    return q.to(device, dtype), k.to(device, dtype)


def tolerances(dtype):
    # same rounded inputs as the reference: only fp32 accumulation order differs, whatever the input dtype;
    # half types get more room for tensor-core accumulation on GPUs
    return dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape,dtype", [
    ((1, 3, 65, 16), torch.float32),
    ((2, 2, 197, 64), torch.float32),
    ((1, 2, 300, 32), torch.bfloat16),
    ((2, 1, 197, 16), torch.float16),
    ((1, 2, 130, 24), torch.float32),       # head_dim padded to 32
    ((1, 2, 65, 64), torch.bfloat16),
])
def test_kernel_matches_naive_reference(interpret, shape, dtype):
    from fpt.extract.importance_kernel import global_importance_triton

    q, k = random_qk(shape, dtype, seed=shape[2])
    scale = shape[-1] ** -0.5
    ours = global_importance_triton(q, k, scale)
    reference = naive_importance(q, k, scale)
    assert ours.dtype == torch.float32 and ours.shape == shape[:3]
    torch.testing.assert_close(ours.double(), reference, **tolerances(dtype))
    n_keep = num_selected(shape[2], 0.2)
    assert_is_topk(ours.topk(n_keep, dim=-1).indices, reference, n_keep)


@pytest.mark.parametrize("n_tokens", [16, 17, 97])
def test_kernel_small_tiles_and_ragged_edges(interpret, n_tokens):
    """Many tiles in both passes, with the last query and key tiles partly empty (or exactly full at 16)."""
    from fpt.extract.importance_kernel import global_importance_triton

    q, k = random_qk((2, 2, n_tokens, 16), torch.float32, seed=n_tokens)
    ours = global_importance_triton(q, k, 0.3, config=SMALL_TILES)
    torch.testing.assert_close(ours.double(), naive_importance(q, k, 0.3), rtol=1e-5, atol=1e-8)


def test_kernel_reads_strided_qkv_views(interpret):
    """The hook's q and k are permuted views into timm's fused qkv output: no copy needed, same result."""
    from fpt.extract.importance_kernel import global_importance_triton

    B, N, H, d = 2, 77, 3, 16
    qkv = torch.randn(B, N, 3 * H * d, generator=torch.Generator().manual_seed(2))
    q, k, _ = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    torch.testing.assert_close(global_importance_triton(q, k, 0.25).double(), naive_importance(q, k, 0.25),
                               rtol=1e-5, atol=1e-8)


def test_kernel_uses_a_given_lse_instead_of_pass_1(interpret):
    from fpt.extract.importance_kernel import global_importance_triton

    q, k = random_qk((1, 2, 70, 32), torch.float32, seed=3)
    lse = torch.logsumexp(q @ k.transpose(-2, -1) * 0.2, dim=-1)                  # [B, H, N], natural log
    reference = naive_importance(q, k, 0.2)
    torch.testing.assert_close(global_importance_triton(q, k, 0.2, lse=lse).double(), reference,
                               rtol=1e-5, atol=1e-8)
    halved = global_importance_triton(q, k, 0.2, lse=lse + torch.log(torch.tensor(2.0)))
    torch.testing.assert_close(halved.double(), reference / 2, rtol=1e-5, atol=1e-8)


def test_kernel_is_deterministic(interpret):
    from fpt.extract.importance_kernel import global_importance_triton

    q, k = random_qk((1, 2, 100, 16), torch.bfloat16, seed=4)
    assert torch.equal(global_importance_triton(q, k, 0.25), global_importance_triton(q, k, 0.25))


def test_token_importance_triton_backend_equals_torch_backend(interpret):
    q, k, v = (torch.randn(2, 3, 65, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(token_importance(q, k, 0.25, backend="triton"),
                               token_importance(q, k, 0.25, backend="torch"), rtol=1e-5, atol=1e-8)
    idx, keys, values = select_important_tokens(q, k, v, 0.25, 0.2, backend="triton")
    assert_is_topk(idx, naive_importance(q, k, 0.25), num_selected(65, 0.2))
    gather = idx.unsqueeze(-1).expand(-1, -1, -1, 16)
    assert torch.equal(keys, k.gather(2, gather)) and torch.equal(values, v.gather(2, gather))


def test_frozen_lpm_with_triton_backend_captures_the_reference_tokens(interpret):
    model, info = create_backbone(MICRO, 64, random_init=True)
    layers = [1, 3]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    out = FrozenLPM(model, layers, 0.25, importance_backend="triton")(images)
    ref = reference_qkv(model, images, layers)
    for i, l in enumerate(layers):
        q, k, v, probs, *_ = ref[l]
        assert_is_topk(out["indices"][:, i], probs.mean(-2), num_selected(65, 0.25))
        gather = out["indices"][:, i].unsqueeze(-1).expand(-1, -1, -1, info.head_dim)
        torch.testing.assert_close(out["keys"][:, i], k.gather(2, gather))
        torch.testing.assert_close(out["values"][:, i], v.gather(2, gather))


def test_cpu_tensors_need_the_interpreter_for_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="CUDA"):
        token_importance(q, q, 1.0, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        token_importance(q, q, 1.0, backend="cuda")


def test_auto_backend_on_cpu_is_the_torch_path(monkeypatch):
    def fail(*_args):
        raise AssertionError("triton used for CPU tensors")

    monkeypatch.setattr(selection, "_importance_triton", fail)
    q, k = random_qk((1, 2, 40, 16), torch.float32, seed=6)
    torch.testing.assert_close(token_importance(q, k, 0.25).double(), naive_importance(q, k, 0.25),
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("capability,dtype,head_dim", [(90, torch.bfloat16, 64)])
def test_kernels_compile_to_tensor_core_code_without_a_gpu(capability, dtype, head_dim, tmp_path, monkeypatch):
    """Lowering for real GPUs checks what the interpreter does not (types, layouts, resources): both kernels,
    with the launch config a GPU would get, compile to cubins whose dots are tensor-core MMAs."""
    from fpt.extract import importance_kernel as ik

    if ik.interpreting():
        pytest.skip("triton.jit gives interpreted functions in this process")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    configs = ik.launch_config(head_dim, dtype)
    for fn, which in ((ik._row_lse_kernel, "lse"), (ik._column_mean_kernel, "col")):
        jitted, launch = ik.triton.jit(fn), configs[which]
        constants = dict(D=head_dim, D_PAD=max(16, ik.triton.next_power_of_2(head_dim)), UPCAST=False,
                         PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
                         BLOCK_Q=launch["BLOCK_Q"], BLOCK_K=launch["BLOCK_K"])
        types = {"Q": f"*{dtype_name}", "K": f"*{dtype_name}", "LSE": "*fp32", "OUT": "*fp32", "qk_scale": "fp32"}
        signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in jitted.arg_names}
        constexprs = {(i,): constants[n] for i, n in enumerate(jitted.arg_names) if n in constants}
        try:
            compiled = ik.triton.compile(ASTSource(jitted, signature, constexprs),
                                         target=GPUTarget("cuda", capability, 32),
                                         options=dict(num_warps=launch["num_warps"], num_stages=launch["num_stages"]))
        except RuntimeError as e:
            if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                pytest.skip(f"no ptxas: {e}")
            raise
        assert compiled.asm["cubin"]
        assert ("wgmma" if capability >= 90 else "mma.sync") in compiled.asm["ptx"]


# ---- CUDA ----

@cuda
@pytest.mark.parametrize("n_tokens,head_dim", [(1025, 64), (577, 80), (300, 32), (4097, 64)])
def test_cuda_kernel_equals_fp32_reference_and_torch_path(n_tokens, head_dim):
    q, k = random_qk((2, 4, n_tokens, head_dim), torch.float32, seed=n_tokens, device="cuda")
    scale = head_dim ** -0.5
    ours = token_importance(q, k, scale, backend="triton")
    torch.testing.assert_close(ours.double(), naive_importance(q, k, scale), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(ours, token_importance(q, k, scale, backend="torch"), rtol=1e-4, atol=1e-8)
    qb, kb = q.bfloat16(), k.bfloat16()
    torch.testing.assert_close(token_importance(qb, kb, scale, backend="triton").double(),
                               naive_importance(qb, kb, scale), rtol=1e-3, atol=1e-7)


@cuda
def test_cuda_bf16_selection_agrees_with_fp32_reference():
    q, k = random_qk((2, 12, 1025, 64), torch.float32, seed=7, device="cuda")
    n_keep = num_selected(1025, 0.2)
    reference = naive_importance(q, k, 0.125).topk(n_keep, dim=-1).indices.reshape(-1, n_keep).cpu()
    ours = token_importance(q.bfloat16(), k.bfloat16(), 0.125).topk(n_keep, dim=-1).indices
    ours = ours.reshape(-1, n_keep).cpu()
    shared = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(reference, ours))
    assert shared / reference.numel() >= 0.99


@cuda
def test_cuda_auto_backend_is_the_deterministic_kernel(monkeypatch):
    q, k = random_qk((2, 12, 1025, 64), torch.bfloat16, seed=8, device="cuda")
    calls = []
    real = selection._importance_triton
    monkeypatch.setattr(selection, "_importance_triton", lambda *a: calls.append(1) or real(*a))
    first = token_importance(q, k, 0.125)
    assert calls and torch.equal(first, token_importance(q, k, 0.125))


@cuda
def test_cuda_kernel_failure_falls_back_to_torch_with_a_warning(monkeypatch):
    def broken(*_args):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(selection, "_importance_triton", broken)
    monkeypatch.setattr(selection, "_triton_state", {"usable": True})
    q, k = random_qk((1, 2, 65, 16), torch.float32, seed=9, device="cuda")
    with pytest.warns(RuntimeWarning, match="torch path"):
        ours = token_importance(q, k, 0.25)
    torch.testing.assert_close(ours, token_importance(q, k, 0.25, backend="torch"))
    assert not selection._triton_state["usable"]


def test_the_auto_backend_dispatches_and_falls_back_as_on_cuda(monkeypatch):
    """The dispatch of the two CUDA tests above, on the CPU: where ``auto`` picks the kernel (made to, here), it
    runs it; a kernel that fails gives one warning, the torch path's result, and the torch path from then on."""
    calls = []
    monkeypatch.setattr(selection, "uses_triton", lambda x, backend: backend == "auto")
    monkeypatch.setattr(selection, "_triton_state", {"usable": True})
    q, k = random_qk((1, 2, 65, 16), torch.float32, seed=9)
    monkeypatch.setattr(selection, "_importance_triton", lambda *a: calls.append(1) or torch.zeros(1, 2, 65))
    assert torch.equal(token_importance(q, k, 0.25), torch.zeros(1, 2, 65)) and calls == [1]

    def broken(*_args):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(selection, "_importance_triton", broken)
    monkeypatch.setattr(selection, "uses_triton", lambda x, backend: backend == "auto"
                        and selection._triton_state["usable"])
    with pytest.warns(RuntimeWarning, match="torch path"):
        ours = token_importance(q, k, 0.25)
    torch.testing.assert_close(ours, token_importance(q, k, 0.25, backend="torch"))
    assert not selection._triton_state["usable"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # no second warning: the torch path now
        torch.testing.assert_close(token_importance(q, k, 0.25), ours)


# ---- the attention's own log-sum-exp (fpt.extract.attention_lse) ----

@pytest.mark.parametrize("family", ["vit_small_patch14_reg4_dinov2", "eva02_tiny_patch14_224",
                                    "vit_small_patch16_rope_224"])
def test_frozen_lpm_takes_the_attentions_lse_and_selects_the_same(interpret, family, monkeypatch):
    """Every chosen layer's kernel call gets the attention's lse (its pass 1 skipped); K/V, indices and the
    pooled feature are those of the two-pass kernel and of the torch path, exactly."""
    from fpt.extract import importance_kernel
    from tests.helpers import tiny_family_model

    model = tiny_family_model(family)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    given, real = [], importance_kernel.global_importance_triton
    monkeypatch.setattr(importance_kernel, "global_importance_triton",
                        lambda q, k, scale, lse=None, config=None: given.append(lse is not None) or
                        real(q, k, scale, lse, config))
    one_pass = FrozenLPM(model, [0, 1], 0.25, importance_backend="triton")(images)
    assert given == [True, True]
    two_pass = FrozenLPM(model, [0, 1], 0.25, importance_backend="triton", attention_lse=False)(images)
    torch_path = FrozenLPM(model, [0, 1], 0.25, importance_backend="torch")(images)
    for name in ("indices", "keys", "values", "cls"):
        assert torch.equal(one_pass[name], two_pass[name]) and torch.equal(one_pass[name], torch_path[name]), name


def test_attention_lse_serves_plain_attention_with_sdpas_own_output():
    import torch.nn.functional as F

    from fpt.extract.attention_lse import AttentionLse

    q, k, v = (torch.randn(2, 3, 50, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    got = []
    with AttentionLse() as mode:
        mode.arm(lambda *args: got.append(args))
        out = F.scaled_dot_product_attention(q, k, v)
        assert not mode.pending()
        again = F.scaled_dot_product_attention(q, k, v)                 # not armed: SDPA as it is
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v)) and torch.equal(again, out)
    (gq, gk, gv, lse, scale), = got
    assert gq is q and gk is k and gv is v and scale == 16 ** -0.5
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-2, -1) * scale, dim=-1))


def test_attention_lse_leaves_masked_attention_and_a_differing_kernel_alone(monkeypatch):
    import torch.nn.functional as F

    from fpt.extract import attention_lse

    q, k, v = (torch.randn(1, 2, 20, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = torch.rand(20, 20, generator=torch.Generator().manual_seed(9)) > 0.3
    monkeypatch.setattr(attention_lse, "_state", {})
    with attention_lse.AttentionLse() as mode:
        mode.arm(lambda *args: pytest.fail("a masked call was served"))
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                           F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        assert mode.pending()
    real = attention_lse.sdpa_with_lse
    monkeypatch.setattr(attention_lse, "sdpa_with_lse", lambda *a: (real(*a)[0] + 1e-3, real(*a)[1]))
    with attention_lse.AttentionLse() as mode:
        mode.arm(lambda *args: pytest.fail("served from a kernel that differs from SDPA"))
        with pytest.warns(RuntimeWarning, match="log-sum-exp"):
            out = F.scaled_dot_product_attention(q, k, v)
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v)) and mode.pending()
    assert attention_lse._state == {"identical": False}


@cuda
@pytest.mark.parametrize("res", [224, 512])
def test_cuda_frozen_lpm_with_the_attentions_lse_stores_the_same_kv(res):
    """bf16 on the GPU: the one-pass LPM stores bit for bit the K/V, indices and feature of the two-pass one."""
    from fpt.extract.encode import forward_fitting

    model, _ = create_backbone("vit_base_patch16_224", res, random_init=True)
    device = torch.device("cuda")
    x = torch.randn(4, 3, res, res, generator=torch.Generator().manual_seed(1)).to(device)
    outs = [forward_fitting(FrozenLPM(model, [6, 11], 0.2, attention_lse=flag).to(device), x, device)
            for flag in (True, False)]
    for name in ("indices", "keys", "values", "cls"):
        assert torch.equal(outs[0][name], outs[1][name]), name


def test_attention_lse_hands_on_the_scale_the_call_gives(monkeypatch):
    """An attention that passes its own ``scale`` (not 1/sqrt(d)) is served with that scale: ``on_lse`` gets it
    with the lse of the scores under it, so the importance computed from them is of the attention the model ran."""
    import torch.nn.functional as F

    from fpt.extract import attention_lse

    monkeypatch.setattr(attention_lse, "_state", {})
    q, k, v = (torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    scale = 0.3 * 16 ** -0.5
    got = []
    with attention_lse.AttentionLse() as mode:
        mode.arm(lambda *args: got.append(args))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        assert not mode.pending()
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, scale=scale))
    (_, _, _, lse, given), = got
    assert given == scale
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-2, -1) * scale, dim=-1))
