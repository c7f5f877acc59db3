"""Build the patched llama.cpp once, cache it, and install it into a Python environment.

Standard library only: this runs before any dependency is installed.

Steps (each skipped when its result is already cached):
  1. fetch the llama-cpp-python sdist with pip and check its sha256;
  2. unpack it, apply ``native/patches/*.patch`` to ``vendor/llama.cpp``;
  3. build libllama + ggml with CMake (no tools, no examples, no common);
  4. build the Python part of llama-cpp-python as a wheel without its native build
     (``-DLLAMA_BUILD=OFF``);
  5. install that wheel into the target interpreter and copy the patched libraries into
     its ``llama_cpp/lib``, so that ``import llama_cpp`` loads them with no environment
     variable.

The cache lives outside the repository, in ``$KVLOCAL_CACHE`` or ``~/.cache/kvlocal``,
keyed by (llama-cpp-python version, patch hash, build flags, CPU).  The build uses
``-march=native``, so the CPU model and flags are part of the key.

Usage:
  python native/build.py                 # build if needed, install into this interpreter
  python native/build.py --cuda          # CUDA build (or KVLOCAL_CUDA=1)
  python native/build.py --stock --no-install --print-libdir   # unpatched lib, for benchmarks
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# bump when the CMake recipe below changes in a way that changes the binaries
RECIPE_VERSION = 1
MANIFEST = "kvlocal-native.json"

HERE = Path(__file__).resolve().parent
PATCH_DIR = HERE / "patches"

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=ON",
    # the libraries find each other next to themselves once copied into llama_cpp/lib
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
]


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[kvlocal-native] {msg}", flush=True)


def cache_root() -> Path:
    root = os.environ.get("KVLOCAL_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kvlocal"


def patch_files(stock: bool) -> list[Path]:
    return [] if stock else sorted(PATCH_DIR.glob("*.patch"))


def cpu_fingerprint() -> str:
    """CPU model and feature flags: -march=native binaries are only valid on a matching CPU."""
    model, flags = platform.machine(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and model == platform.machine():
                model += " " + val.strip()
            elif key in ("flags", "Features") and not flags:
                flags = " ".join(sorted(val.split()))
    return model + " | " + hashlib.sha256(flags.encode()).hexdigest()[:12]


def build_key(stock: bool, cuda: bool, cuda_arch: str) -> tuple[str, dict]:
    h = hashlib.sha256()
    patches = {}
    for p in patch_files(stock):
        data = p.read_bytes()
        patches[p.name] = hashlib.sha256(data).hexdigest()
        h.update(p.name.encode() + b"\0" + data + b"\0")
    patch_hash = h.hexdigest()
    flags = CMAKE_FLAGS + (["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"] if cuda else [])
    info = {
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "patch_hash": patch_hash,
        "patches": patches,
        "cmake_flags": flags,
        "recipe": RECIPE_VERSION,
        "cuda": cuda,
        "cpu": cpu_fingerprint(),
    }
    key_src = json.dumps({k: info[k] for k in ("llama_cpp_python", "patch_hash", "cmake_flags", "recipe", "cpu")},
                         sort_keys=True)
    kind = "stock" if stock else "patched"
    key = f"{LLAMA_CPP_PYTHON_VERSION}-{kind}{'-cuda' if cuda else ''}-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}"
    return key, info


def run(cmd: list[str], log_file: Path, env: dict | None = None, cwd: Path | None = None) -> None:
    with open(log_file, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if proc.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- last lines of {log_file} ---\n{tail}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(root: Path, python: str, log_file: Path) -> Path:
    sdist = root / "sdist" / SDIST_NAME
    if sdist.exists() and sha256_file(sdist) == SDIST_SHA256:
        return sdist
    sdist.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist with pip")
    with tempfile.TemporaryDirectory(dir=sdist.parent) as tmp:
        run([python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp], log_file)
        got = Path(tmp) / SDIST_NAME
        if not got.exists():
            raise BuildError(f"pip download did not produce {SDIST_NAME}")
        digest = sha256_file(got)
        if digest != SDIST_SHA256:
            raise BuildError(f"sdist sha256 mismatch: got {digest}, expected {SDIST_SHA256}")
        os.replace(got, sdist)
    return sdist


def unpack(sdist: Path, dest: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    src = dest / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        raise BuildError("unexpected sdist layout: vendor/llama.cpp missing")
    return src


def apply_patches(llama_dir: Path, patches: list[Path], log_file: Path) -> None:
    for p in patches:
        log(f"applying {p.name}")
        run(["patch", "-p1", "--batch", "--forward", "-i", str(p)], log_file, cwd=llama_dir)


def cmake_build(llama_dir: Path, build_dir: Path, flags: list[str], jobs: int, log_file: Path) -> None:
    env = dict(os.environ)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", str(llama_dir), "-B", str(build_dir), *gen, *flags], log_file, env=env)
    run(["cmake", "--build", str(build_dir), "--target", "llama", "-j", str(jobs)], log_file, env=env)


def copy_libs(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy lib*.so* (keeping symlinks as symlinks) from src_dir to dst_dir."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for f in sorted(src_dir.iterdir()):
        if f.name.startswith("lib") and ".so" in f.name:
            target = dst_dir / f.name
            if target.is_symlink() or target.exists():
                target.unlink()
            if f.is_symlink():
                target.symlink_to(os.readlink(f))
            else:
                shutil.copy2(f, target)
            names.append(f.name)
    if not any(n.startswith("libllama.so") for n in names):
        raise BuildError(f"no libllama.so in {src_dir}")
    return names


def build(root: Path, key: str, info: dict, stock: bool, jobs: int, python: str) -> Path:
    out = root / "native" / key
    if (out / MANIFEST).exists():
        return out
    work_root = root / "tmp"
    work_root.mkdir(parents=True, exist_ok=True)
    log_file = root / "native" / f"{key}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("")
    t0 = time.time()
    sdist = fetch_sdist(root, python, log_file)
    with tempfile.TemporaryDirectory(dir=work_root) as tmp:
        tmp = Path(tmp)
        log(f"building {key} (log: {log_file})")
        src = unpack(sdist, tmp)
        llama_dir = src / "vendor" / "llama.cpp"
        apply_patches(llama_dir, patch_files(stock), log_file)
        log(f"cmake build of libllama + ggml with {jobs} jobs (a few minutes on 2 cores)")
        cmake_build(llama_dir, tmp / "build", info["cmake_flags"], jobs, log_file)
        stage = tmp / "out"
        libs = copy_libs(tmp / "build" / "bin", stage / "lib")
        log("building the llama-cpp-python Python package without its native part")
        env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
        run([python, "-m", "pip", "wheel", "--no-deps", "-w", str(stage / "wheel"), str(src)], log_file, env=env)
        wheels = list((stage / "wheel").glob("llama_cpp_python-*.whl"))
        if len(wheels) != 1:
            raise BuildError("expected exactly one llama_cpp_python wheel")
        manifest = dict(info, key=key, libs=libs, wheel=wheels[0].name,
                        build_seconds=round(time.time() - t0, 1),
                        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    log(f"built in {time.time() - t0:.0f} s, cached at {out}")
    return out


def site_llama_cpp_dir(python: str) -> Path | None:
    code = ("import importlib.util,sys;s=importlib.util.find_spec('llama_cpp');"
            "print(s.submodule_search_locations[0] if s else '')")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    path = res.stdout.strip()
    return Path(path) if res.returncode == 0 and path else None


def install(out: Path, python: str) -> Path:
    manifest = json.loads((out / MANIFEST).read_text())
    pkg = site_llama_cpp_dir(python)
    installed = None
    if pkg is not None and (pkg / "lib" / MANIFEST).exists():
        installed = json.loads((pkg / "lib" / MANIFEST).read_text()).get("key")
    if installed == manifest["key"]:
        return pkg
    log_file = out.parent / f"{manifest['key']}.install.log"
    log_file.write_text("")
    if pkg is None or not (pkg / "__init__.py").exists() or installed is None:
        log("installing the llama-cpp-python Python package")
        run([python, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(out / "wheel" / manifest["wheel"])],
            log_file)
        # its own pure-Python dependencies, from the registry
        run([python, "-m", "pip", "install", "typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1",
             "jinja2>=2.11.3"], log_file)
        pkg = site_llama_cpp_dir(python)
        if pkg is None:
            raise BuildError("llama_cpp is not importable after installing its wheel")
    lib = pkg / "lib"
    if lib.exists():
        shutil.rmtree(lib)
    copy_libs(out / "lib", lib)
    shutil.copy2(out / MANIFEST, lib / MANIFEST)
    log(f"installed {manifest['key']} into {lib}")
    return pkg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="interpreter to install into (default: this one)")
    ap.add_argument("--cuda", action="store_true", default=os.environ.get("KVLOCAL_CUDA", "") not in ("", "0"),
                    help="build with -DGGML_CUDA=ON (also KVLOCAL_CUDA=1)")
    ap.add_argument("--cuda-arch", default=os.environ.get("KVLOCAL_CUDA_ARCH", "native"),
                    help="CMAKE_CUDA_ARCHITECTURES for --cuda (default: native)")
    ap.add_argument("--stock", action="store_true", help="build without the kvlocal patches (for comparisons)")
    ap.add_argument("--no-install", action="store_true", help="only build and cache")
    ap.add_argument("--print-libdir", action="store_true", help="print the cached library directory")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)

    if sysconfig.get_platform().startswith(("win", "macosx")):
        log("note: this script has only been exercised on Linux")
    root = cache_root()
    key, info = build_key(args.stock, args.cuda, args.cuda_arch)
    (root / "native").mkdir(parents=True, exist_ok=True)
    try:
        with open(root / "native" / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            out = build(root, key, info, args.stock, args.jobs, args.python)
            if not args.no_install:
                if args.stock:
                    raise BuildError("--stock builds are for comparisons only; use --no-install")
                install(out, args.python)
    except BuildError as exc:
        log(f"error: {exc}")
        return 1
    if args.print_libdir:
        print(out / "lib")
    return 0


if __name__ == "__main__":
    sys.exit(main())
