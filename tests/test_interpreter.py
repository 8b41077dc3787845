"""The package's own fixes for Triton's interpreter (llmkernels/triton_kernels/interpreter.py).

1. In a fresh Python process with nothing of the test harness imported, as a user runs it with
   ``TRITON_INTERPRET=1``, bf16 attention and masked softmax through ``backend="triton"`` are computed by the
   triton backend and are right by the tolerance rule.
2. Each probe sees its bug (injected into the interpreter here, so this holds whatever Triton is installed) and
   its fix cures it; after ``prepare()`` every probe passes on the installed Triton.
3. An interpreter the fixes do not cure (simulated) makes the triton backend decline the affected dtypes with a
   reason: ``auto`` then picks the reference backend and ``backend="triton"`` raises that reason.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import llmkernels
from conftest import INTERPRETING
from llmkernels import contract, dispatch
from llmkernels.triton_kernels import interpreter

ROOT = Path(__file__).resolve().parents[1]

needs_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="the probe kernels run in Triton's interpreter; the subprocess test covers GPU machines")

CLEAN_SCRIPT = textwrap.dedent(r'''
    import importlib.util, json, sys
    import torch
    import llmkernels
    from llmkernels import dispatch, reference
    from llmkernels.triton_kernels import interpreter

    root = sys.argv[1]
    spec = importlib.util.spec_from_file_location("tolerance", root + "/tests/tolerance.py")
    tolerance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tolerance)

    report = {"file": llmkernels.__file__, "harness": sorted(m for m in ("pytest", "conftest") if m in sys.modules)}
    calls = []
    triton_backend = dispatch.get_backend("triton")
    for method in ("attention_forward", "attention_backward", "softmax_forward", "softmax_backward"):
        def spy(*args, _method=method, _original=getattr(triton_backend, method)):
            calls.append(_method)
            return _original(*args)
        setattr(triton_backend, method, spy)

    def leaves(*ts):
        return [t.detach().clone().requires_grad_(True) for t in ts]

    def attention_case(name, shape_q, shape_kv, backward, **kw):
        gen = torch.Generator().manual_seed(len(name))
        q, k, v = (torch.randn(s, generator=gen).to(torch.bfloat16) for s in (shape_q, shape_kv, shape_kv))
        g = torch.randn(shape_q, generator=gen).to(torch.bfloat16)
        results = {}
        for what, ins, run in (("ours", leaves(q, k, v), lambda *a: llmkernels.scaled_dot_product_attention(
                                    *a, backend="triton", **kw)),
                               ("ref64", leaves(q.double(), k.double(), v.double()),
                                lambda *a: reference.scaled_dot_product_attention(*a, compute_dtype=torch.float64,
                                                                                  **kw)),
                               ("naive", leaves(q, k, v), lambda *a: reference.scaled_dot_product_attention(*a, **kw))):
            out = run(*ins)
            grads = torch.autograd.grad(out, ins, g.to(out.dtype)) if backward else ()
            results[what] = (out,) + tuple(grads)
        names = ("out", "dq", "dk", "dv")
        for i, (ours, ref64, naive) in enumerate(zip(results["ours"], results["ref64"], results["naive"])):
            tolerance.assert_by_rule(f"{name} {names[i]}", ours, ref64, naive, torch.bfloat16)
        report[name] = tolerance.max_err(results["ours"][0], results["ref64"][0])

    # GQA decoding-like: 8 query heads share 2 key/value heads, one query row, 300 keys.
    attention_case("gqa", (3, 8, 1, 32), (3, 2, 300, 32), backward=False, enable_gqa=True)
    # Causal, odd length (129 = a full tile plus one row/column), forward and backward (the backward sums bf16
    # terms, where a truncating fp32 -> bf16 conversion drifts).
    attention_case("causal", (2, 4, 129, 32), (2, 4, 129, 32), backward=True, is_causal=True)

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 17, 129, generator=gen).to(torch.bfloat16)
    mask = torch.randn(1, 3, 1, 129, generator=gen).to(torch.bfloat16)
    mask[..., ::5] = float("-inf")
    g = torch.randn(x.shape, generator=gen).to(torch.bfloat16)
    (xo,) = leaves(x)
    y = llmkernels.masked_softmax(xo, mask, scale=0.7, backend="triton")
    (dx,) = torch.autograd.grad(y, xo, g)
    (x64,) = leaves(x.double())
    y64 = reference.masked_softmax(x64, mask.double(), scale=0.7, compute_dtype=torch.float64)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    (xn,) = leaves(x)
    yn = reference.masked_softmax(xn, mask, scale=0.7)
    (dxn,) = torch.autograd.grad(yn, xn, g)
    tolerance.assert_by_rule("softmax y", y, y64, yn, torch.bfloat16)
    tolerance.assert_by_rule("softmax dx", dx, dx64, dxn, torch.bfloat16)
    report["softmax"] = tolerance.max_err(y, y64)

    report["calls"] = sorted(set(calls))
    report["interpreter"] = interpreter.describe()
    print("REPORT " + json.dumps(report))
''')


def test_bf16_in_a_clean_interpreter_process_is_computed_by_triton_and_right(tmp_path):
    """What a user gets: no test harness, TRITON_INTERPRET=1, bf16 through the triton backend, vs float64."""
    script = tmp_path / "user_script.py"
    script.write_text(CLEAN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LLMKERNELS_BACKEND")}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(script), str(ROOT)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"user script failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert len(lines) == 1, proc.stdout
    report = json.loads(lines[0][len("REPORT "):])
    assert Path(report["file"]).resolve() == ROOT / "llmkernels" / "__init__.py"  # the checkout under test
    assert report["harness"] == []
    # The triton backend did the work (backend="triton" raises rather than falls back, and the spies saw it).
    assert report["calls"] == ["attention_backward", "attention_forward", "softmax_backward", "softmax_forward"]
    assert "declined" not in report["interpreter"], report["interpreter"]


@needs_interpreter
def test_after_prepare_every_probe_passes():
    outcomes = interpreter.prepare()
    assert set(outcomes) == {fix.name for fix in interpreter.FIXES}
    for fix in interpreter.FIXES:
        assert outcomes[fix.name].reason is None, outcomes[fix.name].reason
        assert fix.probe() is None, fix.name
    assert interpreter.unsupported_reasons((torch.bfloat16, torch.float16, torch.float32)) == []


def _inject_raw_storage_dot(monkeypatch):
    """The bug of triton 3.6-3.9's interpreter: a bf16 dot multiplies the uint16 storage as integers."""
    import numpy as np
    from triton.runtime import interpreter as ti

    def create_dot(self, a, b, d, *args):
        return ti.TensorHandle(np.matmul(a.data, b.data, dtype=d.data.dtype) + d.data, d.dtype.scalar)

    monkeypatch.setattr(ti.InterpreterBuilder, "create_dot", create_dot)


def _inject_truncating_cast(monkeypatch):
    """The bug of triton 3.6-3.9's interpreter: fp32 -> bf16 keeps the top 16 bits (truncation)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti
    original = ti.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            return ti.TensorHandle((bits >> 16).astype(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(ti.InterpreterBuilder, "cast_impl", cast_impl)


def _inject_failing_index(monkeypatch):
    """The bug of triton 3.6's interpreter under NumPy 2.4: ``int()`` of a scalar tensor raises."""
    from triton.runtime import interpreter as ti
    original = ti._patch_lang_tensor

    def fail(self):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", fail)

    monkeypatch.setattr(ti, "_patch_lang_tensor", _patch_lang_tensor)


@needs_interpreter
@pytest.mark.parametrize("name, inject", [("bf16_dot", _inject_raw_storage_dot),
                                          ("bf16_cast", _inject_truncating_cast),
                                          ("scalar_index", _inject_failing_index)])
def test_probe_sees_the_bug_and_the_fix_cures_it(monkeypatch, name, inject):
    import triton
    fix = {f.name: f for f in interpreter.FIXES}[name]
    interpreter.prepare()  # the real fixes are in place first; the injected bug sits on top (undone afterwards)
    inject(monkeypatch)
    assert fix.probe() is not None, f"the {name} probe did not see the injected bug"
    outcome = interpreter._settle(fix, triton.__version__)
    assert outcome.needed and outcome.applied and outcome.reason is None, outcome
    assert outcome.found
    assert fix.probe() is None


# ---------------------------------------------------------------------------------------------------------------
# an interpreter the fixes cannot cure (simulated)


def _cannot_fix():
    raise interpreter.CannotFix("triton.runtime.interpreter.InterpreterBuilder.create_dot does not exist")


def _simulate(monkeypatch, *fixes):
    """Replace the known fixes by ``fixes`` and forget what prepare() found, for this test only."""
    monkeypatch.setattr(interpreter, "FIXES", tuple(fixes))
    monkeypatch.setattr(interpreter, "_outcomes", None)
    monkeypatch.setattr(interpreter, "interpreting", lambda: True)
    monkeypatch.setattr(dispatch, "triton_interpreting", lambda: True)


def _attention_inputs(dtype, mask_dtype=None):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=gen).to(dtype) for _ in range(3))
    mask = None if mask_dtype is None else torch.randn(5, 5, generator=gen).to(mask_dtype)
    return q, k, v, mask


def _simulate_unfixable_bf16_dot(monkeypatch):
    """Simulate an interpreter whose bf16 tl.dot bug the probe finds and no fix cures; returns the list the probe
    appends to on each run (it must run once, then its outcome is cached)."""
    probed = []

    def probe():
        probed.append(1)
        return "max |error| 8e8"

    _simulate(monkeypatch, interpreter.Fix("bf16_dot", (torch.bfloat16,), "computes bf16 tl.dot wrongly", probe,
                                           _cannot_fix))
    return probed


@pytest.mark.skipif(dispatch._TRITON_IMPORT_ERROR is not None, reason="triton is not importable")
def test_unfixable_bf16_bug_declines_bf16_only(monkeypatch):
    probed = _simulate_unfixable_bf16_dot(monkeypatch)
    triton_backend = dispatch.get_backend("triton")
    q, k, v, _ = _attention_inputs(torch.bfloat16)
    args = contract.check_attention(q, k, v)
    reasons = triton_backend.attention_reasons(args)
    assert len(reasons) == 1
    assert "computes bf16 tl.dot wrongly" in reasons[0] and "cannot fix" in reasons[0]
    assert "create_dot does not exist" in reasons[0] and "bfloat16 inputs" in reasons[0]
    assert dispatch.choose_attention_backend(args) == "reference"
    x = torch.randn(3, 7, dtype=torch.bfloat16)
    assert triton_backend.softmax_reasons(contract.check_masked_softmax(x)) == reasons
    assert dispatch.choose_softmax_backend(contract.check_masked_softmax(x)) == "reference"
    # auto computes (on the reference backend); an explicit triton request says why not.
    out = llmkernels.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, llmkernels.scaled_dot_product_attention(q, k, v, backend="reference"))
    with pytest.raises(dispatch.NotSupportedError, match="computes bf16 tl.dot wrongly") as info:
        llmkernels.scaled_dot_product_attention(q, k, v, backend="triton")
    assert "cannot fix this interpreter" in str(info.value) and "'triton'" in str(info.value)
    with pytest.raises(dispatch.NotSupportedError, match="computes bf16 tl.dot wrongly"):
        llmkernels.masked_softmax(x, backend="triton")
    # Other dtypes are untouched; a bf16 float mask on fp16 inputs is declined too (its gradient is bf16).
    q16, k16, v16, m16 = _attention_inputs(torch.float16, torch.bfloat16)
    assert triton_backend.attention_reasons(contract.check_attention(q16, k16, v16)) == []
    assert dispatch.choose_attention_backend(contract.check_attention(q16, k16, v16)) == "triton"
    assert triton_backend.attention_reasons(contract.check_attention(q16, k16, v16, m16)) == reasons
    assert len(probed) == 1  # probed once, then cached


@pytest.mark.skipif(dispatch._TRITON_IMPORT_ERROR is not None, reason="triton is not importable")
def test_fix_that_does_not_cure_declines(monkeypatch):
    applied = []
    _simulate(monkeypatch, interpreter.Fix("bf16_cast", (torch.bfloat16,), "converts fp32 to bf16 wrongly",
                                           lambda: "1.0078125 -> 1.0", lambda: applied.append(1)))
    q, k, v, _ = _attention_inputs(torch.bfloat16)
    with pytest.raises(dispatch.NotSupportedError, match="fix did not cure it"):
        llmkernels.scaled_dot_product_attention(q, k, v, backend="triton")
    assert applied == [1]
    outcome = interpreter.prepare()["bf16_cast"]
    assert outcome.needed and outcome.applied and "1.0078125 -> 1.0" in outcome.reason
    assert dispatch.choose_attention_backend(contract.check_attention(q, k, v)) == "reference"


@pytest.mark.skipif(dispatch._TRITON_IMPORT_ERROR is not None, reason="triton is not importable")
def test_unfixable_interpreter_wide_bug_declines_every_dtype(monkeypatch):
    def probe():
        raise RuntimeError("simulator exploded")

    _simulate(monkeypatch, interpreter.Fix("scalar_index", None, "fails on range() bounds computed from a program id",
                                           probe, _cannot_fix))
    triton_backend = dispatch.get_backend("triton")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v, _ = _attention_inputs(dtype)
        reasons = triton_backend.attention_reasons(contract.check_attention(q, k, v))
        assert len(reasons) == 1 and "simulator exploded" in reasons[0], reasons
        assert "cannot run in this interpreter" in reasons[0]
        assert dispatch.choose_attention_backend(contract.check_attention(q, k, v)) == "reference"


def test_marker_is_what_torch_compilers_assume_constant_result_sets():
    def f():
        return 0

    torch.compiler.assume_constant_result(f)
    marked = {k: v for k, v in vars(f).items()}
    assert marked == {"_dynamo_marked_constant": True}
    assert vars(interpreter.unsupported_reasons).get("_dynamo_marked_constant") is True


@pytest.mark.skipif(dispatch._TRITON_IMPORT_ERROR is not None, reason="triton is not importable")
def test_first_probe_inside_torch_compile_fullgraph(monkeypatch):
    """The first use may be inside a compiled function: the probe runs at trace time, and the graph compiles."""
    probed = _simulate_unfixable_bf16_dot(monkeypatch)
    q, k, v, _ = _attention_inputs(torch.bfloat16)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda q, k, v: llmkernels.scaled_dot_product_attention(q, k, v), fullgraph=True,
                                 backend="aot_eager")
        out = compiled(q, k, v)
    finally:
        torch._dynamo.reset()
    assert probed == [1]
    assert torch.equal(out, llmkernels.scaled_dot_product_attention(q, k, v, backend="reference"))
