"""The package as pip users get it: an sdist, a wheel built from it, installed into a fresh virtual environment.

The wheel must carry the CUDA C++ sources (llmkernels/csrc, package data) so that the installed package builds the
CUDA extension just in time as a checkout does. The fresh environment gets torch through a ``.pth`` line naming this
interpreter's site-packages (a plain path: the ``.pth`` files there, the checkout's editable-install finder among
them, are not processed), so the test costs no torch install, and runs from a temporary directory with no
PYTHONPATH: only the installed copy of llmkernels can be imported, which the child process checks.

The build uses this session's build cache (LLMKERNELS_CACHE_DIR, default ~/.cache/llmkernels): the build directory
is named by a hash of the sources' contents and compiles copies of them staged inside it, so the wheel's build and
the checkout's (tests/test_cuda_backend.py) are one build, compiled once. The test checks that the staged copies are
the installed wheel's files. A cold build is about 2-3 minutes on 2 cores, a cached one a few seconds.
"""

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from llmkernels import cuda_build, cuda_ext

REPO = Path(__file__).resolve().parent.parent
CSRC_FILES = cuda_build.SOURCES + cuda_build.HEADERS


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel): the sdist from setuptools' PEP 517 hook (what ``python -m build --sdist`` calls; no new
    dependency), the wheel by ``pip wheel`` from the unpacked sdist, which also proves the sdist holds everything a
    wheel build needs and keeps stale files of the checkout's build/ folder out of the wheel."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-c", "import sys, setuptools.build_meta as b; b.build_sdist(sys.argv[1])", str(out)],
         cwd=REPO)
    (sdist,) = out.glob("*.tar.gz")
    unpacked = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tar:
        # the "data" filter (no absolute paths, links out of the tree...) where this Python has it
        tar.extractall(unpacked, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (source,) = unpacked.iterdir()
    plain = {k: v for k, v in os.environ.items() if k != "LLMKERNELS_BUILD_CUDA"}  # the plain (pip index) wheel
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(out)],
         env=plain)
    (wheel,) = out.glob("*.whl")
    print(f"\nsdist {sdist.name}: {sdist.stat().st_size / 1024:.0f} KiB; wheel {wheel.name}: "
          f"{wheel.stat().st_size / 1024:.0f} KiB")
    return sdist, wheel


def test_sdist_and_wheel_carry_the_package_and_its_cuda_sources(dists):
    sdist, wheel = dists
    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "tests/conftest.py",
                   "tests/test_wheel.py", "benchmarks/metrics.py"):
        assert needed in in_sdist, needed
    package = {p.relative_to(REPO).as_posix() for p in (REPO / "llmkernels").rglob("*.py")
               if "__pycache__" not in p.parts}
    csrc = {f"llmkernels/csrc/{name}" for name in CSRC_FILES}
    assert package | csrc <= in_sdist
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = set(zf.namelist())
        assert package | csrc <= in_wheel, sorted((package | csrc) - in_wheel)
        for name in csrc:
            assert zf.read(name) == (REPO / name).read_bytes(), name
    # Only the package and its metadata: no tests, no build leftovers, no prebuilt extension in a plain build.
    assert all(n.startswith(("llmkernels/", "llmkernels-")) for n in in_wheel)
    assert not any(n.endswith(".so") for n in in_wheel)


CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import llmkernels
    from llmkernels import cuda_build, cuda_ext
    info = {"file": llmkernels.__file__, "sys_path": sys.path, "csrc": str(cuda_build.CSRC),
            "csrc_files": sorted(os.listdir(cuda_build.CSRC)) if cuda_build.CSRC.is_dir() else None,
            "toolkit": cuda_build.find_cuda_home()}
    start = time.time()
    info["reason"] = cuda_ext.unavailable_reason()  # builds the extension just in time when not cached
    info["seconds"] = time.time() - start
    if info["reason"] is None:
        import torch
        info["module"] = cuda_ext.module_path()
        info["ops"] = [op for op in ("attention_forward", "attention_backward", "masked_softmax_forward",
                                     "masked_softmax_backward", "dropout_keep_mask")
                       if hasattr(torch.ops.llmkernels_cuda, op)]
        staged = Path(info["module"]).parent / "src"
        info["staged_equal"] = {n: (staged / n).read_bytes() == (cuda_build.CSRC / n).read_bytes()
                                for n in cuda_build.SOURCES + cuda_build.HEADERS}
    print("RESULT " + json.dumps(info))
""")


def test_installed_wheel_builds_the_cuda_extension_from_its_own_sources(dists, tmp_path):
    _, wheel = dists
    env_dir = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    python = env_dir / "bin" / "python"
    site_packages = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                         .stdout.strip())
    parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "_parent_site_packages.pth").write_text("".join(p + "\n" for p in sorted(parent)))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
          str(wheel)])

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["LLMKERNELS_CACHE_DIR"] = str(cuda_ext.cache_root())  # shared with test_cuda_backend: one build
    work = tmp_path / "work"
    work.mkdir()
    proc = _run([str(python), "-c", CHILD], cwd=work, env=env)
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    info = json.loads(line[len("RESULT "):])

    # The installed copy, not the checkout, and the checkout nowhere on the path.
    installed = site_packages / "llmkernels"
    assert Path(info["file"]).resolve() == (installed / "__init__.py").resolve()
    repo = str(REPO.resolve())
    assert not [p for p in info["sys_path"] if p and (os.path.realpath(p) + "/").startswith(repo + "/")]
    # The CUDA sources are found inside the installed package.
    assert Path(info["csrc"]).resolve() == (installed / "csrc").resolve()
    assert set(CSRC_FILES) <= set(info["csrc_files"] or ())

    if info["toolkit"] is None:
        assert "no CUDA toolkit" in info["reason"]
        pytest.skip("no CUDA toolkit (nvcc) on this machine: the sources were found, the build cannot run")
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} has no CUDA support: it cannot build CUDA extensions")
    # No GPU is needed: the extension compiles, links and imports, and its ops register.
    print(f"\nextension from the installed wheel ready in {info['seconds']:.1f} s: {info['module']}")
    assert info["reason"] is None
    assert Path(info["module"]).resolve().is_relative_to(cuda_ext.cache_root().resolve())
    assert len(info["ops"]) == 5
    assert all(info["staged_equal"].values()), info["staged_equal"]
