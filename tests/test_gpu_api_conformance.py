"""edgevl's TensorRT and cuda-python calls checked on a CPU against the APIs of the versions it targets, so that a
renamed or removed binding fails here rather than on the first GPU run.

TensorRT: the targeted versions are the surfaces in tests/api_surfaces/ (TensorRT 10.3 for JetPack 6 and the newest
11.x; make_surfaces.py says how they are read off the wheels, so nothing is downloaded here). cuda-python: the
installed cuda.bindings modules, imported (they import without a GPU).

The collector parses every edgevl source file (the repository's .py files outside tests/) and follows, without
regard to statement order, where the tensorrt and cuda.bindings modules and the objects they make go: local names,
instance attributes (self.engine), function parameters and return values (trt from import_tensorrt(), a context
from new_context()), tuples (trt, cudart = _imports()) and containers (a list, set or dict stands for the values of
its items). An object's class
comes from the surfaces' return types (builder.create_network() -> INetworkDefinition) or, for cuda-python, from
the docstring's Returns section (cudaGetDeviceProperties -> cudaError_t, cudaDeviceProp). Each of these is a use:
an attribute read or written on such a value, a keyword argument of a TensorRT call, a method that a subclass of a
TensorRT class overrides (TensorRT calls it by name), and an enum member name compared as a string
(err.name == "cudaErrorNoDevice").
A use under `if hasattr(x, "name")` (its `not`, or after an early return) is required only by the versions that
take that branch; getattr(x, "name", default) is a probe, required by none. BRANCHES records which branch each
targeted version takes.
Limits: a value that travels only through a container method (list.append), *args, **kwargs or a class-level
attribute is not followed, so uses on it are not seen (REACHED proves that the flows edgevl relies on are); only
keyword names are checked, not how many positional arguments a call passes.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SURFACES = Path(__file__).resolve().parent / "api_surfaces"
NOT_SOURCE = {"tests", "build", "dist"}  # top-level folders that are not edgevl code (hidden ones neither)
TRT = "tensorrt"
CUDA_MODULES = {"cuda.bindings.runtime": "runtime", "cuda.bindings.driver": "driver", "cuda.bindings.nvrtc": "nvrtc"}
EMPTY = frozenset()

# The version probes in edgevl's TensorRT code -> whether each targeted version has the probed name: True runs the
# branch that uses it, False the fallback. Checked against the surfaces and against the probes found in the code.
BRANCHES = {
    # >= 10.1 (both targets); the fallback's ICudaEngine.device_memory_size is gone in 11, which never runs it
    "ICudaEngine.get_device_memory_size_for_profile_v2": {"10.3.0": True, "11.4.0.106": True},
    # >= 10.1 (both targets); the fallback assigns the IExecutionContext.device_memory property
    "IExecutionContext.set_device_memory": {"10.3.0": True, "11.4.0.106": True},
    "IProgressMonitor": {"10.3.0": True, "11.4.0.106": True},  # >= 10.0: build progress in the log
    # a getattr with a default: 11 builds strongly typed anyway, and 11.4 still has the flag
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": {"10.3.0": True, "11.4.0.106": True},
}
# Uses that exist only if the collector follows edgevl's indirections (parameters, self attributes, returns,
# tuples, lambdas, subclass overrides, helper functions): if one goes missing, the collector went blind there.
REACHED = {
    TRT: {"IExecutionContext.execute_async_v3", "IExecutionContext.set_tensor_address", "ICudaEngine.get_tensor_mode",
          "Runtime.deserialize_cuda_engine", "Builder.build_serialized_network", "IBuilderConfig.progress_monitor",
          "IProgressMonitor.phase_start", "ITimingCache.serialize", "ITensor.name", "Logger.WARNING", "__version__"},
    "runtime": {"cudaGraphLaunch", "cudaFreeHost", "cudaMemcpyKind.cudaMemcpyHostToDevice", "cudaDeviceProp.major",
                "cudaError_t.cudaErrorNoDevice", "cudaError_t.name", "cudaMalloc"},
    "driver": {"cuMemcpyHtoD", "cuLaunchKernel", "CUresult.CUDA_SUCCESS",
               "CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR"},
    "nvrtc": {"nvrtcGetCUBIN", "nvrtcGetSupportedArchs"},
}
CUDA_NAME = re.compile(r"(cuda|cu|nvrtc)[A-Z]\w*|CU[a-z]\w*|(CU|CUDA|NVRTC)_[A-Z0-9_]+")  # cudaMalloc, CUresult


# -- what the libraries offer ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    params: frozenset | None  # keyword names of a callable ("**": any); None: not callable
    returns: frozenset  # TensorRT classes it returns, or is an instance of
    alias: str | None  # the TensorRT class this name is


def read_surface(path: Path) -> dict[str, Entry]:
    entries = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, params, returns, alias = re.fullmatch(r"([\w.]+)(?:\((.*)\))?(?: -> ([\w.|]+)| = ([\w.]+))?",
                                                        line).groups()
            entries[name] = Entry(None if params is None else frozenset(params.split(", ")) - {""},
                                  frozenset(returns.split("|")) if returns else EMPTY, alias)
    return entries


TRT_SURFACES = {p.name[len("tensorrt-"):-len(".txt")]: read_surface(p) for p in sorted(SURFACES.glob("tensorrt-*.txt"))}
TENSORRT_10 = next((v for v in TRT_SURFACES if v.startswith("10.")), "none")  # JetPack 6's
TENSORRT_11 = next((v for v in TRT_SURFACES if v.startswith("11.")), "none")


@dataclass(frozen=True)
class Api:  # a GPU library's module ("" path), class or function
    lib: str
    path: str


@dataclass(frozen=True)
class Obj:  # an instance of the GPU library's class `cls`
    lib: str
    cls: str


@dataclass(frozen=True)
class Tup:  # a tuple whose items' values are known apart: a cuda-python result, `return trt, cudart`
    items: tuple


@dataclass(frozen=True)
class Many:  # a list, set, dict (its values) or generator: the values its items may have
    values: frozenset


def contents(values: frozenset) -> frozenset:
    """What iterating (or indexing by a variable) gives: a tuple's items, a container's values."""
    return frozenset().union(EMPTY, *(frozenset().union(EMPTY, *v.items) if isinstance(v, Tup) else
                                      v.values if isinstance(v, Many) else EMPTY for v in values))


def tup(items) -> frozenset:
    # An item that is itself a container stands for its contents, so recursive code cannot nest them forever.
    items = tuple(frozenset().union(EMPTY, *(contents({v}) if isinstance(v, (Tup, Many)) else {v} for v in item))
                  for item in items)
    return frozenset({Tup(items)}) if any(items) else EMPTY


def many(values) -> frozenset:
    inner = frozenset().union(EMPTY, *(v.values if isinstance(v, Many) else {v} for v in values))
    return frozenset({Many(inner)}) if inner else EMPTY


def cuda_result(lib: str, module, function) -> Tup:
    """What a cuda-python call returns, from its docstring: a tuple (error, outputs...) typed where a type is the
    module's own class (`prop : :py:obj:`~.cudaDeviceProp``)."""
    items = []
    for line in (function.__doc__ or "").partition("Returns\n-------\n")[2].splitlines():
        if re.fullmatch(r"-{3,}", line):  # the next section's underline: its title was no return value
            items.pop()
            break
        if line and not line[0].isspace():
            name = (re.findall(r"(\w+)`?\s*$", line) or [""])[0]
            own = getattr(getattr(module, name, None), "__module__", None) == module.__name__
            items.append(frozenset({Obj(lib, name)}) if own else EMPTY)
    return Tup(tuple(items))


class Libraries:
    """Member lookups: TensorRT from the targeted surfaces together, cuda-python from its modules."""

    def __init__(self, trt_surfaces: list[dict[str, Entry]], cuda_modules: dict):
        self.trt = {name: entry for surface in trt_surfaces for name, entry in surface.items()}
        self.trt_classes = ({n.rpartition(".")[0] for n in self.trt} |
                            {c for e in self.trt.values() for c in e.returns | {e.alias}}) - {"", None}
        self.cuda = cuda_modules

    def resolve(self, lib: str, path: str):
        value = self.cuda.get(lib)
        for part in filter(None, path.split(".")):
            value = getattr(value, part, None)
        return value

    def member(self, lib: str, owner: str, name: str) -> frozenset:
        """What `owner.name` gives used as a value or called (member values stand for call results)."""
        path = f"{owner}.{name}" if owner else name
        if lib == TRT:
            entry = self.trt.get(path)
            if entry is None:
                return EMPTY
            if path in self.trt_classes or entry.alias:
                return frozenset({Api(TRT, entry.alias or path)})
            return frozenset(Obj(TRT, cls) for cls in entry.returns)
        value = getattr(self.resolve(lib, owner), name, None)
        if isinstance(value, type):
            return frozenset({Api(lib, path)})
        if callable(value):
            return frozenset({cuda_result(lib, self.cuda[lib], value)})
        is_own = type(value).__module__ == getattr(self.cuda.get(lib), "__name__", None)
        return frozenset({Obj(lib, type(value).__qualname__)}) if is_own else EMPTY  # an enum member

    def exists(self, lib: str, owner: str, name: str) -> bool:
        return exists_in(self.trt, owner, name) if lib == TRT else hasattr(self.resolve(lib, owner), name)


def exists_in(surface: dict[str, Entry], owner: str, name: str, keyword: str | None = None) -> bool:
    """Whether a TensorRT surface has owner.name ("" owner: the module), taking `keyword` if one is given."""
    entry = surface.get(f"{owner}.{name}" if owner else name)
    return entry is not None and (keyword is None or bool(entry.params and {keyword, "**"} & entry.params))


# -- the collector ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Use:
    lib: str
    owners: tuple  # the classes or paths `name` is looked up on ("" = the module); any one having it will do
    name: str
    where: str  # file:line
    guards: frozenset = EMPTY  # (lib, probed names, present): the hasattr branches the use sits in
    keyword: str | None = None  # a keyword argument of the call owner.name(...)
    probe: bool = False  # hasattr / getattr with a default: may be missing

    def names(self) -> list[str]:
        return [f"{o}.{self.name}" if o else self.name for o in self.owners]

    def __str__(self):
        return f"{self.where}: {'|'.join(self.names())}" + (f"(... {self.keyword}=)" if self.keyword else "")


@dataclass(frozen=True)
class Def:  # an edgevl function or class, by (file, qualname)
    key: tuple


@dataclass(frozen=True)
class Inst:  # an instance of an edgevl class
    key: tuple


@dataclass(frozen=True)
class Bound:  # an edgevl method with its instance
    key: tuple
    instance: Inst


@dataclass(frozen=True)
class Mod:  # an edgevl module
    name: str


def _decorators(node) -> set[str]:
    return {d.id for d in getattr(node, "decorator_list", ()) if isinstance(d, ast.Name)}


def _terminates(block: list) -> bool:
    return bool(block) and isinstance(block[-1], (ast.Return, ast.Raise, ast.Continue, ast.Break))


def _bound_names(node) -> set[str]:
    """Names a function (or module) binds itself, so a lookup knows where a name lives (Python's own rule)."""
    args = getattr(node, "args", None)
    names = {a.arg for a in ast.walk(args) if isinstance(a, ast.arg)} if args else set()
    stack = list(node.body)
    while stack:
        child = stack.pop()
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(child.name)
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in child.names)
        elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
            names.add(child.id)
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(child))
    return names


class Collector:
    """Every use of a GPU library in `sources` ({relative path: code}); see the module docstring."""

    def __init__(self, libraries: Libraries, sources: dict[str, str]):
        self.libs, self.trees, self.modules = libraries, {}, {}
        self.defs, self.keys, self.parent, self.method_of, self.locals = {}, {}, {}, {}, {}
        for path, code in sources.items():
            parts = path[:-len(".py")].split("/")
            self.modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
            self.trees[path] = ast.parse(code, path)
            self._index(self.trees[path], path, "", (path, ""), None)
        self.env, self.fields, self.returns = defaultdict(frozenset), defaultdict(frozenset), defaultdict(frozenset)
        self.bases, self.trt_bases, self.def_guards = {}, defaultdict(frozenset), {}
        for _ in range(50):
            state = self._state()
            self.uses = set()  # only the last pass's: earlier ones knew fewer receivers
            self._pass()
            if self._state() == state:
                return
        raise AssertionError("the collector did not converge")

    def _index(self, node, path, prefix, scope, cls):
        key = (path, prefix.rstrip("."))
        self.locals[key] = _bound_names(node)
        for child in ast.iter_child_nodes(node):
            self._index_child(child, path, prefix, key if not isinstance(node, ast.ClassDef) else scope, cls)

    def _index_child(self, node, path, prefix, scope, cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            key = (path, prefix + node.name)
            self.defs[key], self.parent[key], self.keys[id(node)] = node, scope, key
            if cls and not isinstance(node, ast.ClassDef):
                self.method_of[key] = cls
            self._index(node, path, prefix + node.name + ".", scope, key if isinstance(node, ast.ClassDef) else None)
        else:
            for child in ast.iter_child_nodes(node):
                self._index_child(child, path, prefix, scope, cls)

    def _state(self):
        return (sum(map(len, self.env.values())), sum(map(len, self.fields.values())),
                sum(map(len, self.returns.values())), frozenset(self.bases.items()),
                frozenset(self.trt_bases.items()), frozenset(self.def_guards.items()))

    def _pass(self):
        for path, tree in self.trees.items():
            self._walk_scope((path, ""), tree.body, EMPTY)
        for key, node in self.defs.items():
            if isinstance(node, ast.ClassDef):
                continue
            params = node.args.posonlyargs + node.args.args
            if key in self.method_of and params and "staticmethod" not in _decorators(node):
                self.env[(key, params[0].arg)] |= {Inst(self.method_of[key])}
            self._walk_scope(key, node.body, self.def_guards.get(key, EMPTY))

    def _walk_scope(self, scope, body, guards):
        self.scope, self.path, self.guards = scope, scope[0], guards
        self.walk(body)

    @contextlib.contextmanager
    def under(self, guards):
        saved, self.guards = self.guards, self.guards | guards
        try:
            yield
        finally:
            self.guards = saved

    # -- statements ------------------------------------------------------------------------------------------

    def walk(self, body: list) -> None:
        saved = self.guards
        for stmt in body:
            self.statement(stmt)
        self.guards = saved

    def statement(self, node) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            key = self.keys[id(node)]
            self.def_guards[key] = self.guards
            self.bind(node.name, frozenset({Def(key)}))
            if isinstance(node, ast.ClassDef):
                self._class(key, node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            self._import(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            values = self.eval(node.value) if node.value else EMPTY
            for target in getattr(node, "targets", None) or [node.target]:
                self.assign(target, values)
        elif isinstance(node, ast.Return):
            self.returns[self.scope] |= self.eval(node.value) if node.value else EMPTY
        elif isinstance(node, ast.If):
            true, false = self.branch_guards(node.test)
            with self.under(true):
                self.walk(node.body)
            with self.under(false):
                self.walk(node.orelse)
            if _terminates(node.body) and not _terminates(node.orelse):
                self.guards |= false  # the rest of this block runs only where the test was false
            elif _terminates(node.orelse) and not _terminates(node.body):
                self.guards |= true
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            self.assign(node.target, contents(self.eval(node.iter)))
            self.walk(node.body + node.orelse)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                values = self.eval(item.context_expr)
                if item.optional_vars:
                    self.assign(item.optional_vars, values)
            self.walk(node.body)
        else:  # while, try, raise, expression statements...: their expressions, then their blocks
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.eval(child)
            for handler in getattr(node, "handlers", ()):
                self.walk(handler.body)
            for name in ("body", "orelse", "finalbody"):
                self.walk(getattr(node, name, None) or [])

    def _class(self, key, node) -> None:
        bases = [v for base in node.bases for v in self.eval(base)]
        self.bases[key] = tuple(v.key for v in bases if isinstance(v, Def))
        for base in (v for v in bases if isinstance(v, Api)):  # TensorRT calls these methods by their names
            self.trt_bases[key] |= {base.path}
            for method in node.body:
                if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.use({base}, method.name, method)
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.def_guards[self.keys[id(child)]] = self.guards

    def _import(self, node) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name if alias.asname else alias.name.split(".")[0]
                self.bind(alias.asname or name, self.module_value(name))
            return
        package = self.scope[0][:-len(".py")].split("/")[:-1] if node.level else []
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        for alias in node.names:
            value = self.module_value(f"{base}.{alias.name}")
            if not value and base in self.modules:
                key = (self.modules[base], alias.name)
                value = frozenset({Def(key)}) if key in self.defs else EMPTY
            self.bind(alias.asname or alias.name, value)

    def module_value(self, name: str) -> frozenset:
        if name == TRT or name in CUDA_MODULES:
            return frozenset({Api(CUDA_MODULES.get(name, TRT), "")})
        return frozenset({Mod(name)}) if name in self.modules else EMPTY

    def bind(self, name: str, values: frozenset) -> None:
        self.env[(self.scope, name)] |= values

    def assign(self, target, values: frozenset) -> None:
        if isinstance(target, ast.Name):
            self.bind(target.id, values)
        elif isinstance(target, ast.Attribute):
            receiver = self.eval(target.value)
            self.use(receiver, target.attr, target)  # a property TensorRT must still have
            for value in receiver:
                if isinstance(value, Inst):
                    self.fields[(value.key, target.attr)] |= values
        elif isinstance(target, ast.Subscript):
            self.eval(target.slice)
            self.assign(target.value, many(values))
        elif isinstance(target, (ast.Tuple, ast.List)):
            starred = [i for i, t in enumerate(target.elts) if isinstance(t, ast.Starred)]
            for value in values or [None]:
                items = value.items if isinstance(value, Tup) else None
                for i, t in enumerate(target.elts):
                    if items is None:
                        part = contents({value} - {None})
                    elif starred and i == starred[0]:
                        part = many(frozenset().union(EMPTY, *items[i:len(items) - len(target.elts) + i + 1]))
                    else:
                        index = i if not starred or i < starred[0] else i - len(target.elts)
                        part = items[index] if -len(items) <= index < len(items) else EMPTY
                    self.assign(t.value if isinstance(t, ast.Starred) else t, part)
        elif isinstance(target, ast.Starred):
            self.assign(target.value, values)

    # -- expressions -----------------------------------------------------------------------------------------

    def eval(self, node) -> frozenset:
        if isinstance(node, ast.Name):
            return self.lookup(node.id)
        if isinstance(node, ast.Attribute):
            return self.attribute(self.eval(node.value), node.attr, node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Tuple) and not any(isinstance(e, ast.Starred) for e in node.elts):
            return tup(self.eval(e) for e in node.elts)
        if isinstance(node, (ast.List, ast.Set, ast.Tuple)):
            return many(frozenset().union(EMPTY, *(contents(self.eval(e.value)) if isinstance(e, ast.Starred)
                                                   else self.eval(e) for e in node.elts)))
        if isinstance(node, ast.Dict):
            for key in filter(None, node.keys):
                self.eval(key)
            return many(frozenset().union(EMPTY, *(self.eval(v) for v in node.values)))
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            for comp in node.generators:
                self.assign(comp.target, contents(self.eval(comp.iter)))
                for condition in comp.ifs:
                    self.eval(condition)
            return many(self.eval(node.value if isinstance(node, ast.DictComp) else node.elt))
        if isinstance(node, ast.Subscript):
            values, index = self.eval(node.value), node.slice
            self.eval(index)
            if isinstance(node.value, ast.Dict):
                self.enum_names(index, node.value.keys)
            if isinstance(index, ast.Constant) and isinstance(index.value, int):
                return frozenset().union(EMPTY, *(v.items[index.value] if isinstance(v, Tup) and
                                                  -len(v.items) <= index.value < len(v.items) else contents({v})
                                                  for v in values))
            return contents(values)
        if isinstance(node, ast.BoolOp):
            return frozenset().union(*(self.eval(v) for v in node.values))
        if isinstance(node, ast.IfExp):
            true, false = self.branch_guards(node.test)
            with self.under(true):
                values = self.eval(node.body)
            with self.under(false):
                return values | self.eval(node.orelse)
        if isinstance(node, ast.NamedExpr):
            values = self.eval(node.value)
            self.assign(node.target, values)
            return values
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "name":
            for comparator in node.comparators:
                self.enum_names(node.left, getattr(comparator, "elts", [comparator]))
        for child in ast.iter_child_nodes(node):  # anything else: its parts may use the libraries
            if isinstance(child, ast.expr):
                self.eval(child)
        return EMPTY

    def lookup(self, name: str) -> frozenset:
        scope = self.scope
        while name not in self.locals.get(scope, ()):
            if scope[1] == "":
                return EMPTY  # a builtin, or a global edgevl never binds
            scope = self.parent[scope]
        return self.env[(scope, name)]

    def use(self, receiver: frozenset, name: str, node, **kind) -> frozenset:
        """Record `name` looked up on the GPU-library values among `receiver`; return what the lookup gives."""
        if name.startswith("__") and name != "__version__":
            return EMPTY
        owners = defaultdict(set)
        for value in receiver:
            if isinstance(value, (Api, Obj)):
                owners[value.lib].add(value.path if isinstance(value, Api) else value.cls)
        found = set()
        for lib, paths in owners.items():
            self.uses.add(Use(lib, tuple(sorted(paths)), name, f"{self.path}:{node.lineno}", self.guards, **kind))
            found.update(v for path in paths for v in self.libs.member(lib, path, name))
        return frozenset(found)

    def attribute(self, receiver: frozenset, name: str, node) -> frozenset:
        found = set(self.use(receiver, name, node))
        for value in receiver:
            if isinstance(value, Mod):
                key = (self.modules[value.name], name)
                found |= {Def(key)} if key in self.defs else self.module_value(f"{value.name}.{name}")
            elif isinstance(value, Inst):
                method = self.method(value.key, name)
                fields = [self.fields[(k, name)] for k in self.mro(value.key)]
                trt_bases = self.trt_bases.get(value.key)
                if method is None and not any(fields) and trt_bases:  # TensorRT's own, inherited
                    found |= self.use({Api(TRT, b) for b in trt_bases}, name, node)
                found.update(*fields)
                if method is not None:
                    decorators = _decorators(self.defs[method])
                    found |= (self.returns[method] if "property" in decorators else
                              {Def(method)} if "staticmethod" in decorators else {Bound(method, value)})
        return frozenset(found)

    def mro(self, key) -> list:
        order = [key]
        for base in self.bases.get(key, ()):
            order += [k for k in self.mro(base) if k not in order]
        return order

    def method(self, cls, name):
        return next(((k[0], f"{k[1]}.{name}") for k in self.mro(cls) if (k[0], f"{k[1]}.{name}") in self.defs), None)

    def call(self, node) -> frozenset:
        builtin = node.func.id if isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr") else None
        if builtin and len(node.args) >= 2 and isinstance(getattr(node.args[1], "value", None), str):
            receiver = self.eval(node.args[0])
            for extra in node.args[2:]:
                self.eval(extra)
            return self.use(receiver, node.args[1].value, node, probe=builtin == "hasattr" or len(node.args) > 2)
        if isinstance(node.func, ast.Attribute):
            receiver = self.eval(node.func.value)
            functions = self.attribute(receiver, node.func.attr, node.func)
            for keyword in (k.arg for k in node.keywords if k.arg):
                self.use({v for v in receiver if getattr(v, "lib", None) == TRT}, node.func.attr, node,
                         keyword=keyword)
            if node.func.attr == "get" and isinstance(node.func.value, ast.Dict) and node.args:
                self.enum_names(node.args[0], node.func.value.keys)
        else:
            functions = self.eval(node.func)
        args = [self.eval(a.value if isinstance(a, ast.Starred) else a) for a in node.args]
        kwargs = {k.arg: self.eval(k.value) for k in node.keywords}
        if any(isinstance(a, ast.Starred) for a in node.args):
            args = args[:next(i for i, a in enumerate(node.args) if isinstance(a, ast.Starred))]
        found = set()
        for function in functions:
            if isinstance(function, Api) and function.lib == TRT:
                found |= {Obj(TRT, function.path)} if function.path in self.libs.trt_classes else set()
            elif isinstance(function, Api):
                found.add(Obj(function.lib, function.path))
            elif isinstance(function, (Obj, Tup)):
                found.add(function)  # a member's value stands for its call's result
            elif isinstance(function, Def) and isinstance(self.defs[function.key], ast.ClassDef):
                init = self.method(function.key, "__init__")
                if init:
                    self.pass_arguments(init, [frozenset({Inst(function.key)})] + args, kwargs)
                found.add(Inst(function.key))
            elif isinstance(function, (Def, Bound)):
                self_arg = [frozenset({function.instance})] if isinstance(function, Bound) else []
                self.pass_arguments(function.key, self_arg + args, kwargs)
                found |= self.returns[function.key]
        return frozenset(found)

    def pass_arguments(self, key, args: list, kwargs: dict) -> None:
        params = self.defs[key].args
        positional = [p.arg for p in params.posonlyargs + params.args]
        for name, values in zip(positional, args):
            self.env[(key, name)] |= values
        for name, values in kwargs.items():
            if name in positional or name in {p.arg for p in params.kwonlyargs}:
                self.env[(key, name)] |= values

    def branch_guards(self, test) -> tuple[frozenset, frozenset]:
        """Guards holding where `test` is true and where it is false: hasattr(x, "name") on a GPU-library x."""
        negated = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
        probe = test.operand if negated else test
        self.eval(test)
        if not (isinstance(probe, ast.Call) and isinstance(probe.func, ast.Name) and probe.func.id == "hasattr"
                and len(probe.args) == 2 and isinstance(probe.args[1], ast.Constant)):
            return EMPTY, EMPTY
        owners = defaultdict(list)
        for value in self.eval(probe.args[0]):
            if isinstance(value, (Api, Obj)):
                owners[value.lib].append(value.path if isinstance(value, Api) else value.cls)
        name = probe.args[1].value
        present = {(lib, tuple(sorted(f"{o}.{name}" if o else name for o in paths)), True)
                   for lib, paths in owners.items()}
        absent = frozenset((lib, names, False) for lib, names, _ in present)
        return (absent, frozenset(present)) if negated else (frozenset(present), absent)

    def enum_names(self, name_node, strings: list) -> None:
        """`x.name` compared with, or looked up among, string literals: those must be members of x's enum."""
        if isinstance(name_node, ast.Attribute) and name_node.attr == "name":
            enums = {v for v in self.eval(name_node.value) if isinstance(v, Obj)}
            for string in strings:
                if isinstance(string, ast.Constant) and isinstance(string.value, str):
                    self.use(enums, string.value, string)


# -- running it -------------------------------------------------------------------------------------------------

def edgevl_sources() -> dict[str, str]:
    folders = [p for p in ROOT.iterdir() if p.is_dir() and p.name not in NOT_SOURCE and not p.name.startswith(".")]
    files = [p for folder in folders for p in folder.rglob("*.py")] + list(ROOT.glob("*.py"))
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted(files)}


def cuda_modules() -> dict:
    try:
        return {lib: importlib.import_module(name) for name, lib in CUDA_MODULES.items()}
    except ImportError:
        return {}


@functools.cache
def libraries() -> Libraries:
    return Libraries(list(TRT_SURFACES.values()), cuda_modules())


@functools.cache
def edgevl_uses() -> frozenset:
    return frozenset(Collector(libraries(), edgevl_sources()).uses)


def collect(code: str) -> set:
    return Collector(libraries(), {"fake/module.py": code}).uses


def takes(use: Use, version: str) -> bool:
    """Whether TensorRT `version` runs the hasattr branches `use` sits in."""
    return all(lib != TRT or any(exists_in(TRT_SURFACES[version], "", n) for n in names) == present
               for lib, names, present in use.guards)


def trt_missing(uses, version: str) -> list[str]:
    """Uses TensorRT `version` lacks, leaving out probes and branches that version does not take."""
    return sorted({str(u) for u in uses if u.lib == TRT and not u.probe and takes(u, version)
                   and not any(exists_in(TRT_SURFACES[version], o, u.name, u.keyword) for o in u.owners)})


def cuda_missing(uses) -> list[str]:
    libs = libraries()
    return sorted({str(u) for u in uses if u.lib != TRT and not u.probe
                   and not any(libs.exists(u.lib, o, u.name) for o in u.owners)})


needs_cuda = pytest.mark.skipif(not cuda_modules(), reason="cuda.bindings (cuda-python) is not installed here: "
                                                           "pip install 'edgevl[gpu]' to check edgevl's CUDA calls")


# -- tests ------------------------------------------------------------------------------------------------------

def test_the_targeted_versions_have_surfaces():
    assert TENSORRT_10.startswith("10.3.") and TENSORRT_11.startswith("11.")
    recorded = {v for versions in BRANCHES.values() for v in versions}
    assert set(TRT_SURFACES) == recorded, f"surfaces for {sorted(TRT_SURFACES)}, BRANCHES for {sorted(recorded)}"


@pytest.mark.parametrize("version", sorted(TRT_SURFACES))
def test_tensorrt_uses_exist_in_targeted_version(version):
    missing = trt_missing(edgevl_uses(), version)
    assert not missing, f"TensorRT {version} lacks names edgevl uses:\n  " + "\n  ".join(missing)


def test_version_branches_are_the_ones_recorded():
    probes = {n: u.where for u in edgevl_uses() if u.lib == TRT and u.probe for n in u.names()}
    assert set(probes) == set(BRANCHES), (f"probes in the code {probes} differ from BRANCHES {sorted(BRANCHES)}: "
                                          "record which branch each targeted version takes")
    taken = {name: {v: exists_in(s, "", name) for v, s in TRT_SURFACES.items()} for name in probes}
    assert taken == BRANCHES


def test_branches_no_target_takes_still_name_real_apis():
    """A fallback for versions older than every target is not run by any: it must at least name an API that some
    targeted version has, or a misspelling there would wait for an old TensorRT to show."""
    untaken = [u for u in edgevl_uses()
               if u.lib == TRT and not u.probe and not any(takes(u, version) for version in TRT_SURFACES)]
    dangling = sorted(str(u) for u in untaken
                      if not any(exists_in(s, o, u.name, u.keyword) for s in TRT_SURFACES.values() for o in u.owners))
    assert not dangling, f"no targeted TensorRT has these fallback names: {dangling}"


def test_collector_follows_edgevl_indirections():
    found = defaultdict(set)
    for use in edgevl_uses():
        found[use.lib].update(use.names())
    for lib, names in REACHED.items():
        if lib == TRT or cuda_modules():
            assert names <= found[lib], f"{lib}: the collector no longer sees {sorted(names - found[lib])}"


def test_misspelled_tensorrt_use_is_reported():
    uses = collect("import tensorrt as trt\n"
                   "def build(onnx_path):\n"
                   "    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
                   "    network = builder.create_netwrok(0)\n"
                   "    config = builder.create_builder_config()\n"
                   "    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPAC, 1 << 30)\n"
                   "    config.set_timing_cache(config.create_timing_cache(b''), ignore_missmatch=False)\n"
                   "    return builder.build_serialized_network(network, config)\n")
    for version in TRT_SURFACES:
        assert trt_missing(uses, version) == [
            "fake/module.py:4: Builder.create_netwrok", "fake/module.py:6: MemoryPoolType.WORKSPAC",
            "fake/module.py:7: IBuilderConfig.set_timing_cache(... ignore_missmatch=)"]


def test_a_name_is_required_only_by_versions_taking_its_branch():
    uses = collect("def scratch(runtime, plan):\n"
                   "    engine = runtime.deserialize_cuda_engine(plan)\n"
                   "    if not hasattr(engine, 'get_device_memory_size_for_profile_v2'):\n"
                   "        return engine.device_memory_size\n"
                   "    return engine.get_device_memory_size_for_profile_v2(0) + engine.device_memory_size\n"
                   "def runtime():\n"
                   "    import tensorrt\n"
                   "    return scratch(tensorrt.Runtime(tensorrt.Logger()), b'')\n")
    assert trt_missing(uses, TENSORRT_10) == []
    assert trt_missing(uses, TENSORRT_11) == ["fake/module.py:5: ICudaEngine.device_memory_size"]


@needs_cuda
def test_cuda_python_uses_exist_in_installed_bindings():
    missing = cuda_missing(edgevl_uses())
    assert not missing, "the installed cuda.bindings lacks names edgevl uses:\n  " + "\n  ".join(missing)


@needs_cuda
def test_every_cuda_looking_attribute_is_checked():
    seen = {u.name for u in edgevl_uses() if u.lib != TRT}
    unchecked = {f"{path}:{n.lineno}: {n.attr}" for path, code in edgevl_sources().items()
                 for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Attribute)
                 and CUDA_NAME.fullmatch(n.attr) and n.attr not in seen}
    assert not unchecked, f"attributes that look like CUDA calls on values the collector does not follow: {unchecked}"


@needs_cuda
def test_misspelled_cuda_use_is_reported():
    uses = collect("from cuda.bindings import runtime as cudart, driver\n"
                   "def probe():\n"
                   "    err, prop = cudart.cudaGetDeviceProperties(0)\n"
                   "    if err != cudart.cudaError_t.cudaSucess or err.name == 'cudaErrorNoDevise':\n"
                   "        return prop.totalGlobalMemory\n"
                   "    return driver.cuMemAlloc(prop.totalGlobalMem), cudart.cudaMallocc(1)\n")
    assert cuda_missing(uses) == [
        "fake/module.py:4: cudaError_t.cudaErrorNoDevise", "fake/module.py:4: cudaError_t.cudaSucess",
        "fake/module.py:5: cudaDeviceProp.totalGlobalMemory", "fake/module.py:6: cudaMallocc"]
