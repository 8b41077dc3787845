"""Every Triton config the GPU path can choose compiles for sm_80 and sm_90, without a GPU.

The compile runs in a separate process because the test session runs Triton's interpreter, whose kernels are
Python functions that cannot be compiled. Asserted for each config: it compiles, it uses no local memory
(no spills), its shared memory fits the architecture, and fp16/bf16 matrix products use the architecture's
matrix instructions (HGMMA on sm_90, HMMA on sm_80).
"""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def static_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "llmkernels.triton_kernels.compile_report", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-20000:])  # the readable report, shown with -s or on failure
    assert out.exists(), f"compile_report did not produce a report:\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def test_every_config_compiles(static_report):
    failed = [f"sm_{r['arch']} {r['name']}: {r['error']}" for r in static_report["configs"] if not r["ok"]]
    assert static_report["configs"], "no configs were listed"
    assert not failed, "configs that do not compile:\n" + "\n".join(failed)


def test_both_architectures_and_both_ops_covered(static_report):
    archs = {r["arch"] for r in static_report["configs"]}
    assert archs == {80, 90}
    names = " ".join(r["name"] for r in static_report["configs"])
    assert "attn" in names and "softmax" in names


def test_no_config_spills(static_report):
    spilling = [f"sm_{r['arch']} {r['name']}: {r['local_bytes']} B local, {r['spill_instructions']} LDL/STL"
                for r in static_report["configs"] if r["ok"] and r["spills"]]
    assert not spilling, "configs that spill (prune them from the GPU path):\n" + "\n".join(spilling)


def test_shared_memory_fits(static_report):
    too_big = [f"sm_{r['arch']} {r['name']}: {r['shared_bytes']} B" for r in static_report["configs"]
               if r["ok"] and not r["shared_fits"]]
    assert not too_big, "configs whose shared memory exceeds the architecture's limit:\n" + "\n".join(too_big)


def test_half_precision_dots_use_tensor_cores(static_report):
    wrong = [f"sm_{r['arch']} {r['name']}: HGMMA {r['hgmma']}, HMMA {r['hmma']}" for r in static_report["configs"]
             if r["ok"] and not r["mma_ok"]]
    assert not wrong, "fp16/bf16 kernels without the expected matrix instructions:\n" + "\n".join(wrong)


def test_excluded_configs_have_reasons(static_report):
    for row in static_report["excluded"]:
        assert row["reason"].strip(), f"excluded config without a reason: {row}"


def _sass(row, name):
    return row["sass_counts"].get(name, 0)


def test_softmax_moves_rows_in_16_byte_vectors_and_long_rows_twice(static_report):
    """Masked softmax, contiguous 16-bit rows with a same-dtype mask (specs of softmax.compile_specs): the SASS
    loads and stores 16-byte vectors, and the counts show the passes: on chip x and the mask are read once and y
    written once (LDG.128 = 2 x STG.128); the long-row path reads both twice (LDG.128 = 4 x STG.128). The
    backward likewise reads dy and y once on chip and twice on long rows."""
    rows = [r for r in static_report["configs"] if r["ok"] and r["name"].startswith("softmax_")
            and ("float16" in r["name"] or "bfloat16" in r["name"]) and "_strided" not in r["name"]
            and "fp32mask" not in r["name"]]
    assert rows
    wrong = []
    for r in rows:
        loads, stores = _sass(r, "LDG.128"), _sass(r, "STG.128")
        reads = 2 if "_long_" in r["name"] else 1
        if not stores or loads != 2 * reads * stores:
            wrong.append(f"sm_{r['arch']} {r['name']}: LDG.128 {loads}, STG.128 {stores} (want {2 * reads} x)")
    assert not wrong, "softmax kernels without the expected 16-byte vector traffic:\n" + "\n".join(wrong)


def test_descriptor_forward_uses_tma_and_warp_specialization(static_report):
    """The sm_90 descriptor forward candidates (attention/forward_tma.py): every one loads through TMA and
    stores O through it, and every warp-specialized one was really split into partitions."""
    rows = [r for r in static_report["configs"] if r["ok"] and r["name"].startswith("attn_fwd_tma")
            and " pointer " not in r["name"]]
    assert rows and {r["arch"] for r in rows} == {90}
    assert all(_sass(r, "UTMALDG") and _sass(r, "UTMASTG") for r in rows), [r["name"] for r in rows]
    ws = [r for r in rows if r["name"].endswith(" ws")]
    assert ws and all(r["ws_partitions"] >= 1 and _sass(r, "SETMAXREG") for r in ws), [r["name"] for r in ws]
