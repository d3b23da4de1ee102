"""Write the TensorRT Python API surfaces that tests/test_gpu_api_conformance.py checks edgevl against.

    python tests/api_surfaces/make_surfaces.py [VERSION ...]     (default: VERSIONS below)

Needs PyPI, a C compiler and binutils (readelf, nm); no GPU and no TensorRT install. The test reads only the files this
writes (tensorrt-<version>.txt beside this script), so CI never downloads anything.

How a surface is derived. The `tensorrt-cu12-bindings` wheel holds the compiled pybind11 module (tensorrt.so)
and the package __init__.py that `import tensorrt` runs (the pip `tensorrt` package star-imports it; JetPack's
python3-libnvinfer installs the same two files as `tensorrt`). The .so cannot be imported without libnvinfer,
but the only symbols it takes from the libnvinfer* libraries are a few C entry points (createInferBuilder_INTERNAL
and the like; everything else is reached through vtables). So the script compiles stand-ins for the libraries the
.so names (DT_NEEDED) that define those entry points as functions returning 0, loads them RTLD_GLOBAL so the
loader takes them for the real ones, imports the package in a child process and reads the API off the live
module objects: registering the bindings builds no TensorRT object, so nothing read depends on the stand-ins. That is more exact than grepping the .so's
strings (pybind11 keeps names there without saying which class owns them) and the wheels ship no .pyi stubs.

Each line of a surface is one name, sorted:
    Name                      a public module-level name (class, function, constant), or __version__
    Class.member              a public attribute of a TensorRT class as dir() sees it, inherited ones included;
                              nested classes (ILogger.Severity) are listed under their __qualname__
    ...(a, b, **)             a callable's keyword names, from pybind11's signature line (every overload), or
                              from inspect.signature for the package's Python helpers; ** = takes any keyword;
                              a class's are its constructor's
    ... -> A|B                the TensorRT classes the callable returns or the property/enum member is an
                              instance of (a List[ITensor] counts as ITensor)
    ... = Qual                the member is itself a TensorRT class (Logger.Severity = ILogger.Severity)
Limits: names starting with "_" are left out (dunders are Python's, not TensorRT's), as are modules the package
imports (os, sys). Return types come from pybind11's docstring signatures, so a binding declared to return a
base class (or `object`) gives the base (or nothing). Names are what Python can reach, not whether TensorRT
still honours them: deprecated APIs are listed until they are removed. The wheel is the x86-64 one for the
running Python; JetPack's aarch64 bindings are built from the same sources.
"""
from __future__ import annotations

import argparse
import ctypes
import inspect
import re
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

# TensorRT 10.3 is JetPack 6's; 11.4.0.106 was the newest 11.x on PyPI when these were written (`pip index versions
# tensorrt-cu12-bindings`). The cu12 and cu13 wheels bind the same API; cu12 is the one JetPack 6 pairs with.
VERSIONS = ("10.3.0", "11.4.0.106")
PACKAGE = "tensorrt-cu12-bindings"
MODULE = "tensorrt_bindings"
OUT_DIR = Path(__file__).resolve().parent


def download(version: str, workdir: Path) -> Path:
    """The wheel for this interpreter, unpacked; returns the folder to put on sys.path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--dest", str(workdir), f"{PACKAGE}=={version}"], check=True)
    wheel, = workdir.glob("*.whl")
    site = workdir / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def stand_in_libraries(extension: Path, workdir: Path) -> Path:
    """Empty libnvinfer* stand-ins defining every symbol the .so needs that this process cannot resolve."""
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(libnv[^\]]+)\]",
                        subprocess.run(["readelf", "-d", str(extension)], capture_output=True, text=True,
                                       check=True).stdout)
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(extension)], capture_output=True, text=True,
                        check=True).stdout
    here = ctypes.CDLL(None)  # libc, libpython: what the real process provides anyway
    # Versioned names (memcpy@GLIBC_2.14) and weak ones ("w") come from the system libraries or may stay unbound.
    missing = [line.split()[-1] for line in nm.splitlines()
               if line.split()[0] == "U" and "@" not in line and not hasattr(here, line.split()[-1])]
    source = workdir / "stand_in.c"
    source.write_text("".join(f"void *{name}(void) {{ return 0; }}\n" for name in missing))
    libs = workdir / "stand_ins"
    libs.mkdir()
    for soname in needed:
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(libs / soname), f"-Wl,-soname,{soname}", str(source)],
                       check=True)
    return libs


# -- run in the child process: read the API off the imported module ----------------------------------------------

def _is_trt_class(value) -> bool:
    return isinstance(value, type) and value.__module__.startswith(MODULE)


def _signatures(name: str, doc: str) -> list[tuple[str, str]]:
    """(parameters, return annotation) of each pybind11 signature line in a docstring."""
    pattern = re.compile(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\) -> (.+)$")
    found = [m.groups() for m in map(pattern.match, (doc or "").splitlines()) if m]
    return [s for s in found if s[0] != "*args, **kwargs"] or found  # an overload set's header line


def _parameter_names(params: str) -> list[str]:
    names, depth, current = [], 0, ""
    for char in params + ",":  # split on top-level commas: defaults like <Enum.X: 0> or [] hold brackets
        if char in "([{<":
            depth += 1
        elif char in ")]}>":
            depth -= 1
        if char == "," and depth == 0:
            names.append(re.split(r"[:=]", current.strip())[0].strip())
            current = ""
        else:
            current += char
    # argN: pybind11's name for an argument bound without py::arg, which cannot be passed by keyword
    return ["**" if n.startswith("**") else n for n in names
            if n and n != "self" and not re.fullmatch(r"arg\d+|\*[^*].*", n)]


def _returns(annotation: str, classes: set[str]) -> list[str]:
    # pybind11 writes a type it had not seen registered yet by its C++ name (nvinfer1::ICudaEngine)
    found = re.findall(rf"(?:{MODULE}\.tensorrt\.|nvinfer1::)([\w.]+)", annotation)
    return [name for name in found if name in classes]


def describe(name: str, value, static, classes: set[str]) -> str:
    """One surface line for `name` (qualified) holding `value` (`static`: as stored, to tell properties);
    `classes`: the qualified names of every TensorRT class, the only return types kept."""
    if isinstance(static, property):
        doc = (static.fget.__doc__ or "").splitlines()[:1]
        returns = _returns(doc[0].split("->")[-1], classes) if doc else []
        return name + (f" -> {'|'.join(returns)}" if returns else "")
    if _is_trt_class(value):
        if value.__qualname__ != name:
            return f"{name} = {value.__qualname__}"
        signatures = _signatures("__init__", value.__init__.__doc__)
    elif callable(value) and not isinstance(value, type):
        signatures = _signatures(name.split(".")[-1], value.__doc__)
        if not signatures and inspect.isfunction(value):  # a helper written in Python in the package __init__
            signatures = [(str(inspect.signature(value))[1:-1], "")]
    else:
        return name + (f" -> {type(value).__qualname__}" if _is_trt_class(type(value)) else "")
    params, returns = [], []
    for raw_params, annotation in signatures:
        params += [p for p in _parameter_names(raw_params) if p not in params]
        returns += [r for r in _returns(annotation, classes) if r not in returns]
    return name + (f"({', '.join(params)})" if signatures else "") + (f" -> {'|'.join(returns)}" if returns else "")


def members(trt) -> list[tuple[str, object, object]]:
    """(qualified name, value, value as stored) of every public module-level name and class attribute."""
    found, classes, seen = [], [], set()
    for name in dir(trt):
        value = getattr(trt, name)
        if not name.startswith("_") and not isinstance(value, types.ModuleType):
            found.append((name, value, value))
            classes += [value] if _is_trt_class(value) else []
    while classes:
        cls = classes.pop()
        if cls.__qualname__ in seen:
            continue
        seen.add(cls.__qualname__)
        for member in (m for m in dir(cls) if not m.startswith("_")):
            value = getattr(cls, member)
            found.append((f"{cls.__qualname__}.{member}", value, inspect.getattr_static(cls, member)))
            classes += [value] if _is_trt_class(value) else []
    return found


def surface(trt) -> list[str]:
    found = members(trt)
    classes = {value.__qualname__ for _, value, _ in found if _is_trt_class(value)}
    return sorted({"__version__"} | {describe(*member, classes) for member in found})


def introspect(site: str, libs: str) -> None:
    for lib in sorted(Path(libs).iterdir()):
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    sys.path.insert(0, site)
    trt = __import__(MODULE)
    print(trt.__version__)
    print("\n".join(surface(trt)))


# -- parent process ------------------------------------------------------------------------------------------

def write_surface(version: str) -> Path:
    with tempfile.TemporaryDirectory(prefix="trt-surface-") as tmp:
        workdir = Path(tmp)
        site = download(version, workdir)
        libs = stand_in_libraries(site / MODULE / "tensorrt.so", workdir)
        # A child process: the stand-ins stay loaded for good, and each version needs its own.
        child = subprocess.run([sys.executable, __file__, "--introspect", str(site), str(libs)],
                               capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"importing {PACKAGE}=={version} over stand-in libraries failed:\n{child.stderr}")
    out = child.stdout.splitlines()
    if out[0] != version:
        raise RuntimeError(f"{PACKAGE}=={version} imported as TensorRT {out[0]}")
    path = OUT_DIR / f"tensorrt-{version}.txt"
    header = [f"# TensorRT {version} Python API ({PACKAGE}=={version}), written by make_surfaces.py: regenerate,",
              "# do not edit. One name a line; see make_surfaces.py for the format and how it is read."]
    path.write_text("\n".join(header + out[1:]) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", default=VERSIONS)
    parser.add_argument("--introspect", nargs=2, metavar=("SITE", "LIBS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.introspect:
        introspect(*args.introspect)
        return
    for version in args.versions:
        path = write_surface(version)
        print(f"{path}: {len(path.read_text().splitlines()) - 2} names")


if __name__ == "__main__":
    main()
