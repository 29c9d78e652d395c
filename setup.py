"""Builds safegene_fast and its native module safegene_fast._C with CMake (CMakeLists.txt).

    pip install --no-build-isolation -e .     # against the torch already installed

Environment:
  SAFEGENE_CUDA=auto|0|1    build the CUDA kernels: auto (default) when the installed torch is a
                            CUDA build and nvcc is found; 1 requires it; 0 never.
  SAFEGENE_CUDA_ARCHS       CUDA SM versions, e.g. "80;90" (default); the newest also gets PTX.
  CUDA_HOME                 the CUDA toolkit (default: nvcc on PATH, else /usr/local/cuda).
"""

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "safegene_fast/_version.py").read_text())[1]


def find_cuda_home():
    """The CUDA toolkit folder holding bin/nvcc, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "bin/nvcc").is_file():
            return Path(home)
    return None


def cuda_cmake_args(torch):
    """CMake arguments for the CUDA decision (SAFEGENE_CUDA), never based on a visible GPU."""
    mode = os.environ.get("SAFEGENE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"SAFEGENE_CUDA must be auto, 0 or 1, not {mode!r}.")
    cuda_home = find_cuda_home()
    missing = []
    if torch.version.cuda is None:
        missing.append(f"the installed torch {torch.__version__} is a CPU-only build")
    if cuda_home is None:
        missing.append("nvcc was not found (set CUDA_HOME)")
    if mode == "0" or (mode == "auto" and missing):
        if missing and mode == "auto":
            print(f"safegene_fast: building CPU kernels only ({'; '.join(missing)}).")
        return ["-DSAFEGENE_WITH_CUDA=OFF"]
    if missing:
        sys.exit(f"SAFEGENE_CUDA=1 but {' and '.join(missing)}.")
    archs = os.environ.get("SAFEGENE_CUDA_ARCHS", "80;90").replace(",", ";").replace(" ", "")
    args = [
        "-DSAFEGENE_WITH_CUDA=ON",
        f"-DSAFEGENE_CUDA_ARCHS={archs}",
        f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin/nvcc'}",
        f"-DCUDAToolkit_ROOT={cuda_home}",
        f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
    ]
    # The toolkit may lack nvrtc and the CUDA libraries' headers; the CUDA torch wheel's
    # nvidia-* packages carry them.
    site = Path(torch.__file__).resolve().parent.parent
    nvrtc = sorted(glob.glob(str(site / "nvidia/**/lib/libnvrtc.so*"), recursive=True))
    if nvrtc and not list(cuda_home.glob("lib*/libnvrtc.so*")):
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    cusparse = sorted(glob.glob(str(site / "nvidia/**/include/cusparse.h"), recursive=True))
    if cusparse and not (cuda_home / "include/cusparse.h").is_file():
        args.append(f"-DSAFEGENE_CUDA_EXTRA_INCLUDE={Path(cusparse[0]).parent}")
    print(f"safegene_fast: building CPU and CUDA kernels (archs {archs}, nvcc in {cuda_home}).")
    return args


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11
        import torch

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A fixed folder per torch build keeps rebuilds incremental across pip runs.
        build_dir = ROOT / "build" / f"cmake-torch{torch.__version__}"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DSAFEGENE_VERSION={VERSION}",
            *cuda_cmake_args(torch),
        ]
        # The cmake and ninja pip packages installed beside this Python come first: the
        # system cmake may be too old for CUDA 20.
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        subprocess.run(configure, check=True, env=env)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True, env=env)


setup(
    name="safegene_fast",
    version=VERSION,
    description="Fast out-of-core extraction and re-application of LLM safety genes",
    packages=find_packages(include=["safegene_fast", "safegene_fast.*"]),
    ext_modules=[Extension("safegene_fast._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "huggingface_hub", "pyyaml", "pydantic>=2"],
    # interop: the method's models and PEFT adapters; ray: `safegene batch --executor ray`
    extras_require={"interop": ["transformers>=5,<6", "peft>=0.18"], "ray": ["ray[default]>=2.40"]},
    entry_points={"console_scripts": ["safegene = safegene_fast.cli:main"]},
    zip_safe=False,
)
